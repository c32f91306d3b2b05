// Package vectors checks the shared wire vectors (tests/wire_vectors/vectors.json) against
// this client's codec: requests encode to exactly their bytes, answers decode to their
// value, invalid frames are rejected the way "expect" says. Used by `go test` and by the
// conformance runner's "vectors" command.
package vectors

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"strings"

	"softlb/clients/go/internal/wire"
)

// Vector is one case of vectors.json. Value keeps the JSON's key order (see Ordered).
type Vector struct {
	Name   string
	Kind   string
	Hex    string
	Expect string
	Value  json.RawMessage
}

// Load reads the vectors file.
func Load(path string) ([]Vector, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var vs []Vector
	if err := json.Unmarshal(b, &vs); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return vs, nil
}

// Check runs one vector; nil means it passed.
func Check(v Vector) error {
	raw, err := hex.DecodeString(v.Hex)
	if err != nil {
		return fmt.Errorf("bad hex: %w", err)
	}
	switch v.Kind {
	case "request":
		return checkRequest(v, raw)
	case "response":
		return checkResponse(v, raw)
	case "invalid":
		return checkInvalid(v, raw)
	}
	return fmt.Errorf("unknown kind %q", v.Kind)
}

// Run checks every vector: how many passed, and the names of those that failed.
func Run(vs []Vector) (passed int, failed []string) {
	failed = []string{}
	for _, v := range vs {
		if Check(v) != nil {
			failed = append(failed, v.Name)
		} else {
			passed++
		}
	}
	return passed, failed
}

func checkRequest(v Vector, want []byte) error {
	val, err := Ordered(v.Value)
	if err != nil {
		return err
	}
	fields, ok := val.([]wire.Field)
	if !ok {
		return fmt.Errorf("request value is not a map")
	}
	got, err := wire.AppendFrame(nil, fields)
	if err != nil {
		return err
	}
	if !bytes.Equal(got, want) {
		return fmt.Errorf("encoded %x, want %x", got, want)
	}
	return nil
}

func checkResponse(v Vector, raw []byte) error {
	body, err := wire.ReadFrame(bufio.NewReader(bytes.NewReader(raw)))
	if err != nil {
		return err
	}
	env, err := wire.ParseEnvelope(body)
	if err != nil {
		return err
	}
	var want map[string]interface{}
	if err := json.Unmarshal(v.Value, &want); err != nil {
		return err
	}
	if !sameJSON(env.ID, want["id"]) {
		return fmt.Errorf("id %v, want %v", env.ID, want["id"])
	}
	if e, isErr := want["error"].(map[string]interface{}); isErr {
		if !env.IsError || env.Code != e["code"] || env.Message != e["message"] {
			return fmt.Errorf("error %s %q, want %v", env.Code, env.Message, e)
		}
		return nil
	}
	res, err := wire.Decode(env.Result)
	if err != nil {
		return err
	}
	if env.IsError || !sameJSON(res, want["result"]) {
		return fmt.Errorf("result %v, want %v", res, want["result"])
	}
	return nil
}

// checkInvalid: what the client's own reader does with each frame the agent must reject.
func checkInvalid(v Vector, raw []byte) error {
	r := bufio.NewReader(bytes.NewReader(raw))
	body, err := wire.ReadFrame(r)
	switch {
	case strings.HasPrefix(v.Expect, "FRAME_TOO_LARGE"):
		if !errors.Is(err, wire.ErrFrameTooLarge) {
			return fmt.Errorf("read gave %v, want frame too large", err)
		}
		return nil
	case strings.HasPrefix(v.Expect, "no answer until the rest arrives"):
		return checkTruncated(raw)
	}
	if err != nil {
		return fmt.Errorf("framing: %w", err)
	}
	if strings.HasPrefix(v.Expect, "BAD_FRAME") {
		if _, err := wire.ParseEnvelope(body); !errors.Is(err, wire.ErrBadFrame) {
			return fmt.Errorf("parse gave %v, want a bad frame", err)
		}
		// "connection continues": the next frame on the same stream still reads.
		next := append(append([]byte{}, raw...), 0, 0, 0, 1, 0x80)
		r = bufio.NewReader(bytes.NewReader(next))
		if _, err := wire.ReadFrame(r); err != nil {
			return err
		}
		if b, err := wire.ReadFrame(r); err != nil || len(b) != 1 {
			return fmt.Errorf("the frame after a bad one did not read: %v", err)
		}
		return nil
	}
	// The rest are well-framed maps the agent refuses for their content (a missing id,
	// an unknown op): the client sees the id the agent will echo in its error.
	env, err := wire.ParseEnvelope(body)
	if err != nil {
		return err
	}
	m, _ := wire.Decode(body)
	op, _ := m.(map[string]interface{})["op"].(string)
	switch {
	case strings.HasPrefix(v.Expect, "BAD_ARGUMENT with id nil"):
		if env.ID != nil {
			return fmt.Errorf("id %v, want none", env.ID)
		}
	case strings.HasPrefix(v.Expect, "UNKNOWN_OP with id "):
		want := strings.TrimPrefix(v.Expect, "UNKNOWN_OP with id ")
		if fmt.Sprint(env.ID) != want || knownOps[op] {
			return fmt.Errorf("id %v op %q, want id %s and an unknown op", env.ID, op, want)
		}
	default:
		return fmt.Errorf("unknown expectation %q", v.Expect)
	}
	return nil
}

var knownOps = map[string]bool{"hello": true, "resolve": true, "report": true, "services": true,
	"endpoints": true, "watch": true, "unwatch": true}

// checkTruncated: part of a frame yields nothing while more may come, and is an
// unexpected EOF (not a frame) when the stream ends.
func checkTruncated(raw []byte) error {
	pr, pw := io.Pipe()
	got := make(chan error, 1)
	go func() {
		_, err := wire.ReadFrame(bufio.NewReader(pr))
		got <- err
	}()
	if _, err := pw.Write(raw); err != nil {
		return err
	}
	select {
	case err := <-got:
		return fmt.Errorf("a truncated frame was answered at once: %v", err)
	default:
	}
	pw.Close()
	if err := <-got; !errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("truncated frame at EOF gave %v", err)
	}
	return nil
}

// Ordered decodes JSON keeping map key order: objects become []wire.Field, integers
// int64, other numbers float64.
func Ordered(b []byte) (interface{}, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	return orderedValue(dec)
}

func orderedValue(dec *json.Decoder) (interface{}, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch t := tok.(type) {
	case json.Delim:
		if t == '[' {
			list := []interface{}{}
			for dec.More() {
				x, err := orderedValue(dec)
				if err != nil {
					return nil, err
				}
				list = append(list, x)
			}
			_, err := dec.Token()
			return list, err
		}
		fields := []wire.Field{}
		for dec.More() {
			k, err := dec.Token()
			if err != nil {
				return nil, err
			}
			x, err := orderedValue(dec)
			if err != nil {
				return nil, err
			}
			fields = append(fields, wire.Field{Key: k.(string), Value: x})
		}
		_, err := dec.Token()
		return fields, err
	case json.Number:
		if i, err := t.Int64(); err == nil {
			return i, nil
		}
		return t.Float64()
	default:
		return t, nil // string, bool, nil
	}
}

// sameJSON compares a decoded msgpack value with a JSON one by their JSON forms.
func sameJSON(got, want interface{}) bool {
	g, err := json.Marshal(got)
	if err != nil {
		return false
	}
	var gv interface{}
	if json.Unmarshal(g, &gv) != nil {
		return false
	}
	return reflect.DeepEqual(gv, want)
}
