//! The `tcpgate` binary's client verbs that need no root and no agent:
//! `policy explain` and where `grant`/`connect` find their token.

mod explain;
mod explain_aws;
mod support;
mod token_source;
