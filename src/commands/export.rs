//! `mailpump export`: connect to the store and write an account's stored messages to files
//! (the work itself is [`crate::export`]).

use crate::config::Config;
use crate::export::{self, ExportOptions};
use crate::store::Store;

/// True when the export completed.
pub async fn run(config: &Config, options: ExportOptions) -> bool {
    let store = match Store::connect(&config.store).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "store_unreachable");
            eprintln!("mailpump: {e}");
            return false;
        }
    };
    let result = export::export(&store, &options, config).await;
    store.shutdown(super::STORE_SHUTDOWN).await;
    match result {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "export_failed");
            eprintln!("mailpump: {e}");
            false
        }
    }
}
