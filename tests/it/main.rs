//! The one integration-test binary (each extra binary re-links kube and k8s-openapi).

mod support;

mod audit_cli;
mod kube_sim;
mod metrics_exposition;
mod openai_client;
mod openai_sim;
mod sandbox;
mod vault_contract;
mod vault_store;
