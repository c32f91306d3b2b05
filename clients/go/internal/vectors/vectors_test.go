package vectors

import (
	"path/filepath"
	"runtime"
	"testing"
)

// File is the shared vectors file, found from this source file (tests run in any cwd).
func file(t *testing.T) string {
	_, here, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(here), "..", "..", "..", "..", "tests", "wire_vectors", "vectors.json")
}

func TestSharedVectors(t *testing.T) {
	vs, err := Load(file(t))
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, v := range vs {
		v := v
		kinds[v.Kind]++
		t.Run(v.Name, func(t *testing.T) {
			if err := Check(v); err != nil {
				t.Error(err)
			}
		})
	}
	if kinds["request"] == 0 || kinds["response"] == 0 || kinds["invalid"] == 0 {
		t.Fatalf("vectors file lacks a kind: %v", kinds)
	}
}

// A checker that passes everything would pass the test above: flip one byte of each
// vector's hex and every request and response must then fail.
func TestCorruptedVectorsFail(t *testing.T) {
	vs, err := Load(file(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		if v.Kind == "invalid" {
			continue
		}
		b := []byte(v.Hex)
		last := len(b) - 1
		if b[last] == '0' {
			b[last] = '1'
		} else {
			b[last] = '0'
		}
		v.Hex = string(b)
		if Check(v) == nil {
			t.Errorf("%s: a corrupted vector passed", v.Name)
		}
	}
}
