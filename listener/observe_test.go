package listener

import "testing"

func TestActionsAppendTo(t *testing.T) {
	for a, want := range map[Actions]string{
		0:                                     "",
		ActionsForward:                        "forward",
		ActionsRedirect:                       "redirect",
		ActionsFixedResponse:                  "fixed-response",
		ActionsForward | ActionsFixedResponse: "forward,fixed-response",
	} {
		if got := a.String(); got != want {
			t.Errorf("%#x: %q, want %q", uint8(a), got, want)
		}
	}
	b := make([]byte, 0, 64)
	if n := testing.AllocsPerRun(100, func() { b = (ActionsForward | ActionsRedirect).AppendTo(b[:0]) }); n != 0 {
		t.Errorf("AppendTo allocates %v times", n)
	}
}
