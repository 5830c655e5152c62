module github.com/krakend-contrib/async-amqp

go 1.26.0

require (
	github.com/luraproject/lura/v2 v2.14.1
	github.com/rabbitmq/amqp091-go v1.16.0
	golang.org/x/time v0.16.0
)

require (
	github.com/krakend/flatmap v1.2.0 // indirect
	github.com/valyala/fastrand v1.1.0 // indirect
	golang.org/x/net v0.51.0 // indirect
	golang.org/x/sync v0.25.0 // indirect
	golang.org/x/text v0.34.0 // indirect
)
