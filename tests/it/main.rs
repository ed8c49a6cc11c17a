//! The one integration-test binary (each extra binary re-links kube and k8s-openapi).

mod support;

mod anomaly;
mod audit_cli;
mod config_corpus;
mod crash_matrix;
mod daemon_e2e;
mod daemon_rig;
mod demo;
mod deploy;
mod failover;
mod fault_matrix;
mod governance;
mod ha_matrix;
mod inventory;
mod kube_roller;
mod kube_sim;
mod leader;
mod load;
mod metrics_exposition;
mod notify;
mod openai_client;
mod openai_sim;
mod rotation_e2e;
mod sandbox;
mod sim_faults;
mod vault_contract;
mod vault_store;
