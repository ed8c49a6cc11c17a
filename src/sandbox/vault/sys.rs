//! `sys/health`, the unauthenticated liveness endpoint.

use super::error::Reply;
use super::State;
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde_json::json;

/// The server version `sys/health` reports: the OpenBao release these shapes were taken from.
pub(super) const VERSION: &str = "2.7.2";

impl State {
    pub(super) fn health(&self, now: DateTime<Utc>) -> Reply {
        Reply::Json(
            StatusCode::OK,
            json!({
                "initialized": true,
                "sealed": false,
                "standby": false,
                "replication_performance_mode": "disabled",
                "replication_dr_mode": "disabled",
                "server_time_utc": now.timestamp(),
                "version": VERSION,
                "cluster_name": self.cluster_name,
                "cluster_id": self.cluster_id,
            }),
        )
    }
}
