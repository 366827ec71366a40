# Every recipe is a thin alias for an xtask command, so `just` is optional.

# bring the stack up and run a demo goal (Ctrl-C stops it)
up *args:
    cargo xtask up {{args}}

# every test against a real nats-server
test *args:
    cargo xtask test {{args}}

# rustfmt check and clippy with warnings denied
lint:
    cargo xtask lint

# install nats-server into .tools/ if none suitable is found
install:
    cargo xtask install

# kill every service and nats-server while runs are in flight
chaos:
    cargo xtask chaos

# speed and memory figures beside raw JetStream, in a release build
bench:
    cargo xtask bench
