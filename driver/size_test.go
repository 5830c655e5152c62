package driver

import (
	"context"
	"strings"
	"testing"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

func TestHeaderFrameSize(t *testing.T) {
	for _, tc := range []struct {
		name string
		msg  amqp.Publishing
		want int
	}{
		{"nothing", amqp.Publishing{}, headerFrameBase},
		{"content type and mode", amqp.Publishing{ContentType: "text/plain", DeliveryMode: 2}, headerFrameBase + 11 + 1},
		{"timestamp and priority", amqp.Publishing{Timestamp: time.Unix(1, 0), Priority: 1}, headerFrameBase + 8 + 1},
		// 4 (table length) + 1+1 ("a") + 1+4+3 ("S", length, "xyz")
		{"a string header", amqp.Publishing{Headers: amqp.Table{"a": "xyz"}}, headerFrameBase + 4 + 2 + 8},
		// 4 + 1+1 + 1+4 (array) + 2×5 (int32)
		{"an array", amqp.Publishing{Headers: amqp.Table{"b": []interface{}{int32(1), int32(2)}}}, headerFrameBase + 4 + 2 + 5 + 10},
		// 4 + 1+1 + 1+4 (table) + 1+1 + 9 (int64)
		{"a nested table", amqp.Publishing{Headers: amqp.Table{"c": amqp.Table{"d": int64(1)}}}, headerFrameBase + 4 + 2 + 5 + 2 + 9},
	} {
		if got := headerFrameSize(tc.msg); got != tc.want {
			t.Errorf("%s: %d bytes, want %d", tc.name, got, tc.want)
		}
	}
}

type framedRecorder struct {
	copyRecorder
	max int
}

func (f *framedRecorder) FrameMax() int { return f.max }

// A copy whose properties would be over the frame size loses the
// publisher's headers, not the driver's.
func TestFitDropsThePublishersHeadersOverTheFrameSize(t *testing.T) {
	msg := amqp.Publishing{Headers: amqp.Table{
		"big": strings.Repeat("x", 5000), keptPrefix + "CC": "q",
		HeaderAttempts: int64(2), HeaderLastError: "status 500",
	}}
	if got := fit(&framedRecorder{max: 8192}, msg); len(got.Headers) != 4 {
		t.Errorf("a copy that fits lost headers: %v", got.Headers)
	}
	got := fit(&framedRecorder{max: 4096}, msg)
	if _, ok := got.Headers["big"]; ok || got.Headers[keptPrefix+"CC"] != nil {
		t.Errorf("the publisher's headers are still there: %v", got.Headers)
	}
	if got.Headers[HeaderAttempts] != int64(2) || !strings.Contains(got.Headers[HeaderLastError].(string), "status 500") ||
		!strings.Contains(got.Headers[HeaderLastError].(string), "frame size") {
		t.Errorf("the driver's headers: %v", got.Headers)
	}
	if headerFrameSize(got) > 4096 {
		t.Errorf("still %d bytes", headerFrameSize(got))
	}
	// Through a flow, as the copies are published.
	rec := &framedRecorder{max: 4096}
	f := &flow{session: framedSession{rec}}
	if err := f.Publish(context.Background(), "", "q", fit(f, msg)); err != nil {
		t.Fatal(err)
	}
	if _, ok := rec.copies[0].msg.Headers["big"]; ok {
		t.Error("a flow does not pass its session's frame size on")
	}
}

type framedSession struct{ *framedRecorder }

func (framedSession) Deliveries() <-chan amqp.Delivery { return nil }

func (framedSession) Done() <-chan struct{} { return nil }
