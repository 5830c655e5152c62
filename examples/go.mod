module github.com/krakend-contrib/async-amqp/examples

go 1.25.0

require (
	github.com/krakend-contrib/async-amqp v0.0.0-20261207045105-1c9348dca547
	github.com/luraproject/lura/v2 v2.14.1
	github.com/rabbitmq/amqp091-go v1.16.0
)

require golang.org/x/text v0.37.0 // indirect
