//! The control API under `/_sim` (never part of Vault's own `/v1` paths): fault settings.

use super::faults::Faults;
use super::VaultSim;
use crate::sandbox::control::parse;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

pub(super) fn routes() -> Router<VaultSim> {
    Router::new().route(
        "/_sim/faults",
        get(get_faults).put(put_faults).delete(delete_faults),
    )
}

async fn get_faults(State(sim): State<VaultSim>) -> Json<Faults> {
    Json(sim.faults())
}

async fn put_faults(State(sim): State<VaultSim>, body: Bytes) -> Response {
    match parse::<Faults>(&body) {
        Ok(f) => {
            sim.set_faults(f);
            Json(sim.faults()).into_response()
        }
        Err(resp) => resp,
    }
}

async fn delete_faults(State(sim): State<VaultSim>) -> StatusCode {
    sim.clear_faults();
    StatusCode::NO_CONTENT
}
