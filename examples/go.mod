module github.com/krakend-contrib/async-amqp/examples

go 1.25.0

require (
	github.com/krakend-contrib/async-amqp v0.0.0-20261207052947-bba319e6cbba
	github.com/luraproject/lura/v2 v2.14.1
	github.com/rabbitmq/amqp091-go v1.16.0
)

require golang.org/x/text v0.37.0 // indirect
