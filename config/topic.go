package config

import "strings"

// routes tells whether an exchange of the given type ("" is topic) routes
// a message with routing key key through a binding with binding key
// binding.
func routes(exchangeType, binding, key string) bool {
	switch exchangeType {
	case "fanout":
		return true
	case "direct":
		return binding == key
	}
	return TopicMatch(binding, key)
}

// TopicMatch tells whether a topic exchange's binding key matches a
// routing key, as RabbitMQ matches them: both are words separated by
// dots, "*" in the binding stands for exactly one word and "#" for zero
// or more. An empty key has no words.
func TopicMatch(binding, key string) bool {
	return matchWords(words(binding), words(key))
}

func words(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ".")
}

func matchWords(binding, key []string) bool {
	for len(binding) > 0 {
		switch binding[0] {
		case "#":
			// Consecutive hashes match what one does.
			for len(binding) > 1 && binding[1] == "#" {
				binding = binding[1:]
			}
			for skip := 0; skip <= len(key); skip++ {
				if matchWords(binding[1:], key[skip:]) {
					return true
				}
			}
			return false
		case "*":
			if len(key) == 0 {
				return false
			}
		default:
			if len(key) == 0 || key[0] != binding[0] {
				return false
			}
		}
		binding, key = binding[1:], key[1:]
	}
	return len(key) == 0
}
