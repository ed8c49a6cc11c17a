//! The HTTP smoke prober: one `GET` per attempt, bounded by the probe's own timeout.

use crate::rotation::ports::{ProbeError, SmokeProber};
use async_trait::async_trait;
use std::time::Duration;

pub struct HttpProber {
    http: reqwest::Client,
}

impl HttpProber {
    pub fn new() -> Result<HttpProber, reqwest::Error> {
        Ok(HttpProber {
            http: reqwest::Client::builder().build()?,
        })
    }
}

#[async_trait]
impl SmokeProber for HttpProber {
    async fn get_status(&self, url: &str, timeout: Duration) -> Result<u16, ProbeError> {
        match self.http.get(url).timeout(timeout).send().await {
            Ok(r) => Ok(r.status().as_u16()),
            Err(e) if e.is_timeout() => Err(ProbeError::Timeout),
            Err(_) => Err(ProbeError::Connect),
        }
    }
}
