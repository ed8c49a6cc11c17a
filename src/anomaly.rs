//! The usage-anomaly trigger.
