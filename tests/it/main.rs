//! The one integration-test binary (each extra binary re-links kube and k8s-openapi).

mod support;

mod kube_sim;
mod leader;
mod openai_sim;
mod sandbox;
mod vault_contract;
mod vault_store;
