#!/usr/bin/env python3
"""Convert the http-desync-guardian YAML corpus to one JSON file.

Scalars are loaded with yaml.BaseLoader (everything stays a string, so values
such as 1000 or 1:30 are not reinterpreted), then the same backslash
unescaping the upstream Rust test harness applies (unescape_value in
src/request_analyzer.rs) is applied to every string field, so the JSON holds
the exact text each case means. Strings are written as UTF-8 (a YAML "\\x88"
is U+0088, i.e. bytes C2 88 on the wire, as upstream sends it).
"""
import json, sys, os, yaml

FILES = ["single-case.yaml", "edge-cases.yaml", "rfc-compliant.yaml", "acceptable.yaml",
         "ambiguous.yaml", "bad-header-characters.yaml", "more-compliant-tests.yaml",
         "severe.yaml", "uri-specific-test-cases.yaml", "real-life-test-cases.yaml"]

def unescape(s):
    out, i = [], 0
    while i < len(s):
        c = s[i]
        if c != "\\":
            out.append(c); i += 1; continue
        i += 1
        if i >= len(s):
            raise ValueError("malformed escape in %r" % s)
        e = s[i]; i += 1
        if e == "x":
            out.append(chr(int(s[i:i+2], 16))); i += 2
        else:
            out.append({"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}.get(e, e))
    return "".join(out)

src = sys.argv[1]
cases = []
for fn in FILES:
    with open(os.path.join(src, fn), encoding="utf-8") as f:
        doc = yaml.load(f, Loader=yaml.BaseLoader)
    for c in doc:
        cases.append({
            "file": fn,
            "name": c["name"],
            "method": unescape(c["method"]),
            "uri": unescape(c["uri"]),
            "version": unescape(c["version"]),
            "headers": [{"name": unescape(h["name"]), "value": unescape(h["value"]), "tier": h["tier"]}
                        for h in (c.get("headers") or [])],
            "expected": {"tier": c["expected"]["tier"], "reason": c["expected"]["reason"],
                         "required_message_items": [unescape(m) for m in c["expected"].get("required_message_items") or []]},
        })
json.dump(cases, sys.stdout, indent=1, ensure_ascii=True)
sys.stdout.write("\n")
