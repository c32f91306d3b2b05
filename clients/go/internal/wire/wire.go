// Package wire is the softlb protocol's framing (docs/PROTOCOL.md §Framing): a 4-byte
// big-endian length, then one msgpack map. It does no I/O beyond reading from the
// bufio.Reader it is given, so the shared vectors test it byte for byte.
package wire

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/vmihailenco/msgpack/v5"
)

// MaxFrame is the largest answer accepted: a `watch` of a huge service is the biggest real one.
const MaxFrame = 64 << 20

var (
	// ErrFrameTooLarge: a length prefix above MaxFrame; the stream cannot be re-framed.
	ErrFrameTooLarge = errors.New("frame length over the limit")
	// ErrBadFrame: a body that is not a msgpack map; framing is intact.
	ErrBadFrame = errors.New("frame body is not a msgpack map")
)

// Field is one key and value of a request. A request is a []Field, not a Go map, because
// map key order is part of the bytes (the vectors pin it) and Go maps have none.
type Field struct {
	Key   string
	Value interface{}
}

// AppendFrame appends the frame for an ordered map. Values are anything msgpack encodes;
// a []Field value is a nested ordered map. Ints take their most compact form and floats
// stay float64, as every other client encodes them.
func AppendFrame(dst []byte, fields []Field) ([]byte, error) {
	buf := bytes.NewBuffer(dst)
	start := buf.Len()
	buf.Write([]byte{0, 0, 0, 0})
	enc := msgpack.GetEncoder()
	defer msgpack.PutEncoder(enc)
	enc.Reset(buf)
	enc.UseCompactInts(true)
	if err := encodeMap(enc, fields); err != nil {
		return dst, err
	}
	out := buf.Bytes()
	binary.BigEndian.PutUint32(out[start:], uint32(len(out)-start-4))
	return out, nil
}

func encodeMap(enc *msgpack.Encoder, fields []Field) error {
	if err := enc.EncodeMapLen(len(fields)); err != nil {
		return err
	}
	for _, f := range fields {
		if err := enc.EncodeString(f.Key); err != nil {
			return err
		}
		if err := encodeValue(enc, f.Value); err != nil {
			return err
		}
	}
	return nil
}

func encodeValue(enc *msgpack.Encoder, v interface{}) error {
	switch v := v.(type) {
	case []Field:
		return encodeMap(enc, v)
	case []interface{}:
		if err := enc.EncodeArrayLen(len(v)); err != nil {
			return err
		}
		for _, x := range v {
			if err := encodeValue(enc, x); err != nil {
				return err
			}
		}
		return nil
	default:
		return enc.Encode(v)
	}
}

// ReadFrame reads one frame's body. A truncated frame is io.ErrUnexpectedEOF once the
// reader ends; until then it simply waits for the rest, as the protocol says.
func ReadFrame(r *bufio.Reader) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		return nil, err
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n > MaxFrame {
		return nil, fmt.Errorf("%w: %d bytes", ErrFrameTooLarge, n)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return body, nil
}

// Envelope is an answer with its result left encoded: the connection's reader only
// routes answers; each caller decodes its own result into its own type.
type Envelope struct {
	ID      interface{} // int64, uint64, string, or nil when absent or nil
	Result  msgpack.RawMessage
	IsError bool
	Code    string
	Message string
}

// ParseEnvelope reads {"id", "result" | "error": {"code", "message"}}; other keys are
// skipped (a newer agent may add some).
func ParseEnvelope(body []byte) (Envelope, error) {
	var env Envelope
	dec := msgpack.GetDecoder()
	defer msgpack.PutDecoder(dec)
	br := bytes.NewReader(body)
	dec.Reset(br) // a bytes.Reader is read directly, unbuffered: br's offset is dec's
	dec.UseLooseInterfaceDecoding(true)
	n, err := dec.DecodeMapLen()
	if err != nil || n < 0 {
		return env, badFrame(err)
	}
	for i := 0; i < n; i++ {
		key, err := dec.DecodeString()
		if err != nil {
			return env, badFrame(err)
		}
		switch key {
		case "id":
			env.ID, err = dec.DecodeInterfaceLoose()
		case "result":
			// A slice of body, not a copy: body is this frame's own buffer.
			start := len(body) - br.Len()
			if err = dec.Skip(); err == nil {
				env.Result = body[start : len(body)-br.Len()]
			}
		case "error":
			env.IsError = true
			err = decodeError(dec, &env)
		default:
			err = dec.Skip()
		}
		if err != nil {
			return env, badFrame(err)
		}
	}
	return env, nil
}

func decodeError(dec *msgpack.Decoder, env *Envelope) error {
	m, err := dec.DecodeInterfaceLoose()
	if err != nil {
		return err
	}
	em, ok := m.(map[string]interface{})
	if !ok {
		return fmt.Errorf("error is %T, not a map", m)
	}
	env.Code, _ = em["code"].(string)
	env.Message, _ = em["message"].(string)
	if env.Code == "" {
		env.Code = "UNKNOWN"
	}
	return nil
}

func badFrame(err error) error {
	if err == nil {
		return ErrBadFrame
	}
	return fmt.Errorf("%w: %v", ErrBadFrame, err)
}

// Decode decodes a body or result into a generic value (maps are map[string]interface{},
// ints int64/uint64): for comparisons and for callers wanting the raw shape.
func Decode(b []byte) (interface{}, error) {
	dec := msgpack.GetDecoder()
	defer msgpack.PutDecoder(dec)
	dec.Reset(bytes.NewReader(b))
	dec.UseLooseInterfaceDecoding(true)
	return dec.DecodeInterfaceLoose()
}
