//! Integration tests of the benchmark tools, as modules of one test binary: the load
//! generator against the real server in-process, the baselines as child processes, and
//! the ghz configs.

mod baselines;
mod bench;
mod common;
mod ghz_configs;
