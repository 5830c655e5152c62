package asyncamqp

import (
	luraconfig "github.com/luraproject/lura/v2/config"

	"github.com/krakend-contrib/async-amqp/config"
)

// Prepare runs, for the tests, the step StartAgent runs before it starts
// an agent: validation and the url_pattern rewrite.
func Prepare(agent *luraconfig.AsyncAgent) error {
	cfg, err := config.FromExtraConfig(agent.ExtraConfig)
	_, err = prepare(agent, cfg, err)
	return err
}
