package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	luraconfig "github.com/luraproject/lura/v2/config"
	"github.com/luraproject/lura/v2/proxy"
	"github.com/luraproject/lura/v2/transport/http/server"
	amqp "github.com/rabbitmq/amqp091-go"

	asyncamqp "github.com/krakend-contrib/async-amqp"
)

// replyRate is the publish rate of the reply run: a low load, so that the
// figure is the round trip of one request, not a queue's wait.
const replyRate = 100

// replyLatency is the reply run: a caller publishes requests with
// reply_to set to RabbitMQ's direct reply-to at replyRate for d, and
// times each request to its reply. With ours, (a) at latencyPoint with
// replies on answers them; otherwise the floor does: a plain amqp091
// consumer calling the same Lura proxy and publishing each reply with a
// confirm before its ack. It returns the latencies and how many requests
// it sent.
func (e *env) replyLatency(ctx context.Context, d time.Duration, ours bool) (latencyReport, int, error) {
	queue := e.broker.queueName("reply", latencyPoint, 1)
	defer e.broker.deleteQueues(queue)
	if err := e.broker.declare(queue); err != nil {
		return latencyReport{}, 0, err
	}
	cfg, err := e.luraConfig(queue, latencyPoint, "no-op", map[string]any{"reply": map[string]any{}})
	if err != nil {
		return latencyReport{}, 0, err
	}
	defer e.broker.deleteQueues(retryQueues(cfg)...)
	server.InitHTTPDefaultTransport(cfg)
	total := int(int64(replyRate) * int64(d) / int64(time.Second))
	var stop func() error
	if ours {
		stop, err = e.startAgent(cfg, asyncamqp.StartAgent)
	} else {
		stop, err = e.replyFloor(ctx, cfg, queue, total)
	}
	if err != nil {
		return latencyReport{}, 0, errors.Join(err, stop())
	}
	took, err := e.calls(ctx, total)
	return took, total, errors.Join(err, stop())
}

// replyFloor answers the requests of queue as a small RPC server written
// with amqp091 would: the Lura proxy of the agent, then the reply, with a
// confirm, then the ack.
func (e *env) replyFloor(ctx context.Context, cfg luraconfig.ServiceConfig, queue string, total int) (func() error, error) {
	agent := cfg.AsyncAgents[0]
	px, err := proxy.DefaultFactory(e.logger).New(&luraconfig.EndpointConfig{
		Endpoint: agent.Name, Timeout: agent.Consumer.Timeout, Backend: agent.Backend, ExtraConfig: agent.ExtraConfig,
	})
	if err != nil {
		return func() error { return nil }, err
	}
	conn, err := amqp.Dial(e.broker.url)
	if err != nil {
		return func() error { return nil }, err
	}
	pub, err := conn.Channel()
	if err == nil {
		err = pub.Confirm(false)
	}
	if err != nil {
		conn.Close()
		return func() error { return nil }, err
	}
	var mu sync.Mutex
	answer := func(ctx context.Context, d *amqp.Delivery) bool {
		resp, err := px(ctx, &proxy.Request{Method: http.MethodPost, Body: io.NopCloser(bytes.NewReader(d.Body)),
			Headers: map[string][]string{"Content-Type": {d.ContentType}}, Params: map[string]string{}})
		if err != nil || resp == nil || resp.Io == nil {
			return false
		}
		body, _ := io.ReadAll(resp.Io)
		mu.Lock()
		c, err := pub.PublishWithDeferredConfirmWithContext(ctx, "", d.ReplyTo, false, false, amqp.Publishing{
			CorrelationId: d.CorrelationId, Headers: amqp.Table{"x-status": int64(resp.Metadata.StatusCode)}, Body: body})
		mu.Unlock()
		return err == nil && c.Wait()
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := consumePlain(sctx, e, latencyPoint, queue, total, answer)
		done <- err
	}()
	return func() error {
		cancel()
		<-done
		conn.Close()
		return nil
	}, nil
}

// calls publishes the requests on a channel that consumes the direct
// reply-to pseudo-queue, and waits for the replies (30 s at most).
func (e *env) calls(ctx context.Context, total int) (latencyReport, error) {
	ch, err := e.broker.conn.Channel()
	if err != nil {
		return latencyReport{}, err
	}
	defer ch.Close()
	replies, err := ch.Consume("amq.rabbitmq.reply-to", "", true, false, false, false, nil)
	if err != nil {
		return latencyReport{}, err
	}
	var mu sync.Mutex
	sentAt := make([]time.Time, total)
	var took []time.Duration
	done := make(chan struct{})
	go func() {
		defer close(done)
		for r := range replies {
			at := time.Now()
			i, err := strconv.Atoi(r.CorrelationId)
			mu.Lock()
			if err == nil && i >= 0 && i < total && !sentAt[i].IsZero() {
				took = append(took, at.Sub(sentAt[i]))
			}
			n := len(took)
			mu.Unlock()
			if n == total {
				return
			}
		}
	}()
	interval := time.Second / replyRate
	for i := 0; i < total; i++ {
		mu.Lock()
		sentAt[i] = time.Now()
		mu.Unlock()
		msg := e.broker.message(i, time.Now().UnixNano())
		msg.ReplyTo, msg.CorrelationId = "amq.rabbitmq.reply-to", strconv.Itoa(i)
		if err := ch.PublishWithContext(ctx, e.broker.exchange, routingKey, false, false, msg); err != nil {
			return latencyReport{}, err
		}
		time.Sleep(interval)
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
	case <-ctx.Done():
	}
	mu.Lock()
	defer mu.Unlock()
	if len(took) < total {
		return latencyReport{}, fmt.Errorf("%d replies to %d requests within 30s", len(took), total)
	}
	slices.Sort(took)
	return latencyReport{Count: len(took), P50: percentile(took, 50), P90: percentile(took, 90),
		P99: percentile(took, 99), Max: took[len(took)-1]}, nil
}

// replyRun measures the floor, then ours, and prints both with their
// ratios.
func (e *env) replyRun(ctx context.Context, w io.Writer, d time.Duration) error {
	progress("reply: floor, then (a), at %s, %d requests/s for %s", latencyPoint, replyRate, d)
	floor, sent, err := e.replyLatency(ctx, d, false)
	if err != nil {
		return fmt.Errorf("floor: %w", err)
	}
	ours, _, err := e.replyLatency(ctx, d, true)
	if err != nil {
		return fmt.Errorf("ours: %w", err)
	}
	fmt.Fprintf(w, "\nrequest to reply (direct reply-to, %d requests/s for %s, %d each, W/prefetch %s):\n"+
		"  (a) ours, replies on:           p50 %s  p90 %s  p99 %s  max %s\n"+
		"  floor, amqp091 + Lura + reply:  p50 %s  p90 %s  p99 %s  max %s\n"+
		"  ours/floor: p50 %.2f  p99 %.2f\n",
		replyRate, d, sent, latencyPoint, ms(ours.P50), ms(ours.P90), ms(ours.P99), ms(ours.Max),
		ms(floor.P50), ms(floor.P90), ms(floor.P99), ms(floor.Max),
		float64(ours.P50)/float64(floor.P50), float64(ours.P99)/float64(floor.P99))
	return nil
}
