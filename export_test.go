package asyncamqp

import (
	"github.com/krakend-contrib/async-amqp/config"
)

// Prepared tells the config a Prepared agent starts with, for the tests.
func (p *Prepared) Config() config.Config { return p.p.cfg }
