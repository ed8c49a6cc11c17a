//! The one integration-test binary (each extra binary re-links kube and k8s-openapi).

mod support;

mod kube_sim;
mod openai_client;
mod openai_sim;
// mod sandbox; // TEMP: enabled once the OpenAI and Kubernetes simulators merge
mod vault_contract;
