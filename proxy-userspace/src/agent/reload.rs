//! SIGHUP: what of a new configuration applies to a running agent.

use std::path::Path;

use crate::config::Config;
use crate::session::Services;

/// SIGHUP: re-reads the configuration and applies what can change live
/// (the intercepted set). A bad file changes nothing.
pub fn reload(config_path: &Path, services: &Services) {
    crate::notify::status("RELOADING=1");
    let config = match Config::load(config_path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "reload rejected; keeping the running configuration");
            crate::notify::status("READY=1\nSTATUS=reload rejected");
            return;
        }
    };
    match (&services.interceptor, config.intercept.is_some()) {
        (Some(interceptor), true) => {
            interceptor
                .set_interfaces(config.intercept.as_ref().and_then(|i| i.interfaces.clone()));
            match interceptor.apply(config.intercept_set.clone(), &services.registry.snapshot()) {
                Ok(report) => tracing::info!(
                    prefixes = report.prefixes,
                    protected = report.protected,
                    sessions_pinned = report.sessions_pinned,
                    "reloaded the intercepted set"
                ),
                Err(e) => {
                    tracing::error!(error = %crate::error_chain(&e), "reload of the intercepted set failed")
                }
            }
        }
        (None, true) | (Some(_), false) => {
            tracing::warn!(
                "turning interception on or off needs a restart; intercepted set unchanged"
            );
        }
        (None, false) => {
            tracing::info!("reload: nothing to apply live (forwards change on restart)")
        }
    }
    reload_policy(&config, services);
    crate::notify::status("READY=1\nSTATUS=serving");
}

/// SIGHUP: a renewed API certificate (same paths) serves new connections.
pub fn reload_certificate(api_tls: Option<&crate::api::TlsFiles>) {
    if let Some(tls) = api_tls {
        match tls.reload() {
            Ok(()) => tracing::info!("reloaded the grant API's certificate"),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), "cannot reload the grant API's certificate; keeping the running one")
            }
        }
    }
}

/// Applies the reloaded `[[policy]]` rules. Issuers and keys are fixed at
/// startup; live grants keep their terms until they expire or are revoked.
fn reload_policy(config: &Config, services: &Services) {
    let (Some(gate), Some(auth)) = (&services.gate, &config.auth) else {
        if services.gate.is_some() != config.auth.is_some() {
            tracing::warn!("turning authentication on or off needs a restart; policy unchanged");
        }
        return;
    };
    match crate::auth::Policy::from_config(&config.policy, auth) {
        Ok(policy) => {
            gate.set_policy(policy);
            tracing::info!(
                rules = config.policy.len(),
                "reloaded the policy (live grants keep their terms)"
            );
        }
        Err(errors) => tracing::error!(
            errors = errors.len(),
            "reloaded policy is invalid; keeping the running one"
        ),
    }
}
