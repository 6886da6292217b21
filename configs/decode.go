package configs

import "fmt"

// Custom decoding. These never return an error: a malformed value is kept as a "bad" note on the
// element and reported by validation, which knows the element's index and so its line
// (BurntSushi/toml would report the line of the last element with that key). Unknown keys inside
// the tables are caught by the strict key check in Load, which walks the same schema.

// UnmarshalTOML accepts "host:port" or { address = "host:port", weight = N }.
func (t *Target) UnmarshalTOML(v any) error {
	*t = Target{}
	switch v := v.(type) {
	case string:
		t.Address, t.Weight, t.weightSet = v, 1, true
	case map[string]any:
		if a, ok := v["address"]; ok {
			s, ok := a.(string)
			if !ok {
				t.bad = fmt.Sprintf("address must be a string \"host:port\", not %s", tomlKind(a))
				return nil
			}
			t.Address = s
		}
		if w, ok := v["weight"]; ok {
			n, ok := w.(int64)
			if !ok {
				t.bad = fmt.Sprintf("weight must be an integer, not %s", tomlKind(w))
				return nil
			}
			t.Weight, t.weightSet = clampInt(n), true
		}
	default:
		t.bad = fmt.Sprintf("must be \"host:port\" or { address = \"host:port\", weight = N }, not %s", tomlKind(v))
	}
	return nil
}

// UnmarshalTOML accepts "group" (weight 1) or [{ group = "a", weight = 90 }, ...].
func (f *Forward) UnmarshalTOML(v any) error {
	switch v := v.(type) {
	case string:
		*f = Forward{{Group: v, Weight: 1, weightSet: true}}
	case []any:
		out := make(Forward, len(v))
		for i, e := range v {
			if m, ok := e.(map[string]any); ok {
				out[i] = weightedGroup(m)
			} else {
				out[i] = WeightedGroup{bad: fmt.Sprintf("must be a table { group = \"name\", weight = N }, not %s", tomlKind(e))}
			}
		}
		*f = out
	case []map[string]any:
		out := make(Forward, len(v))
		for i, m := range v {
			out[i] = weightedGroup(m)
		}
		*f = out
	default:
		*f = Forward{{bad: fmt.Sprintf("must be a group name or an array of { group = \"name\", weight = N }, not %s", tomlKind(v))}}
	}
	return nil
}

func weightedGroup(m map[string]any) WeightedGroup {
	var w WeightedGroup
	if g, ok := m["group"]; ok {
		s, ok := g.(string)
		if !ok {
			return WeightedGroup{bad: fmt.Sprintf("group must be a string, not %s", tomlKind(g))}
		}
		w.Group = s
	}
	if x, ok := m["weight"]; ok {
		n, ok := x.(int64)
		if !ok {
			return WeightedGroup{Group: w.Group, bad: fmt.Sprintf("weight must be an integer, not %s", tomlKind(x))}
		}
		w.Weight, w.weightSet = clampInt(n), true
	}
	return w
}

// clampInt keeps huge TOML integers out of int overflow while still failing range checks.
func clampInt(n int64) int {
	const lim = 1 << 30
	switch {
	case n > lim:
		return lim
	case n < -lim:
		return -lim
	}
	return int(n)
}

// tomlKind names a decoded TOML value's type the way a user writes it.
func tomlKind(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case []any, []map[string]any:
		return "an array"
	case map[string]any:
		return "a table"
	case nil:
		return "nothing"
	}
	return "a date/time"
}
