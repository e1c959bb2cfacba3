//! The gateway in front of the built-in sandbox, as `--sandbox` runs it:
//! every spec error code reachable through gRPC, the invoice life cycle,
//! tenant isolation, concurrency, and the refusal of bad start-ups.

mod client;
mod codes;
mod lifecycle;
mod rest;
mod startup;
