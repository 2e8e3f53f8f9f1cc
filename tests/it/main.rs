//! Integration tests: the relay over real sockets against the real RabbitMQ.
//! Each test starts its own relay with a unique exchange, so they run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod faults;
mod process;
mod providers;
mod proxy;
mod silent;

mod abuse;
mod hostile;
mod limits;
mod relay;
mod secrets;
mod statuses;
