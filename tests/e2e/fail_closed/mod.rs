//! Fail closed: never delete the wrong data, never report erased what is not, never crash on
//! a spec, never act as a deputy. One submodule per group of rules, each proven on the real
//! servers (kube-apiserver, redis-server, moto; Loki and Elasticsearch through their tests).

mod credentials;
mod erasure;
mod matching;
mod spec;
mod sweeps;
