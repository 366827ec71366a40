//! Service runs: what a service's spec may hold, and the wake reasons.
//!
//! A service run plans nothing itself. It is started (its wake sources set up), stays
//! `doing` while idle, and each wake — a schedule's fire, its interval, a webhook, a
//! manual turn — is a heartbeat run of the service's goal, recorded in the service's
//! log ([`ServiceWoken`]) before it begins. Its spec lives in its `RunRequested`, so a
//! restart rebuilds every wake source from the log alone.
//!
//! [`ServiceWoken`]: dispatch_proto::run::v1::ServiceWoken

use std::net::SocketAddr;

use dispatch_bus::RunId;
use dispatch_proto::command::v1::SubmitGoal;
use dispatch_proto::run::v1::{Listener, ServiceSpec, ServiceWoken, run_event::Body};
use prost::Message as _;

use crate::submit::MAX_PAYLOAD_BYTES;
use crate::{Error, ErrorKind, RunLog};

/// The kind of a service run.
pub const KIND: &str = "service";

/// Why a service woke.
pub const WAKE_SCHEDULE: &str = "schedule";
pub const WAKE_INTERVAL: &str = "interval";
pub const WAKE_WEBHOOK: &str = "webhook";
pub const WAKE_MANUAL: &str = "manual";
pub const WAKES: [&str; 4] = [WAKE_SCHEDULE, WAKE_INTERVAL, WAKE_WEBHOOK, WAKE_MANUAL];

/// Bounds on a spec: it is recorded in the service's first event and in its goal.
pub const MAX_SCHEDULES: usize = 16;
pub const MAX_LISTENERS: usize = 8;
pub const MAX_METHODS: usize = 8;
pub const MAX_SPEC_BYTES: usize = 32 * 1024;
pub const MAX_PATH_CHARS: usize = 256;
pub const MAX_TIME_ZONE_CHARS: usize = 64;
pub const MAX_SOURCE_CHARS: usize = 512;

/// The request size limits a listener has unless it names its own, and the most it may
/// name.
pub const DEFAULT_MAX_BODY_BYTES: u32 = 8192;
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 4096;
pub const MAX_BODY_BYTES: u32 = 32 * 1024;
pub const MAX_HEADER_BYTES: u32 = 16 * 1024;

/// Checks a service's spec: every schedule parses, every listener is well formed, and
/// the whole is small. The error names the part at fault.
pub fn check_spec(spec: &ServiceSpec) -> Result<(), String> {
    if spec.encoded_len() > MAX_SPEC_BYTES {
        return Err(format!(
            "the spec is {} bytes; at most {MAX_SPEC_BYTES}",
            spec.encoded_len()
        ));
    }
    if spec.source.chars().count() > MAX_SOURCE_CHARS || spec.source.contains(char::is_control) {
        return Err(format!(
            "source must be at most {MAX_SOURCE_CHARS} printable characters"
        ));
    }
    if spec.schedules.len() > MAX_SCHEDULES {
        return Err(format!(
            "{} schedules; at most {MAX_SCHEDULES}",
            spec.schedules.len()
        ));
    }
    for (i, schedule) in spec.schedules.iter().enumerate() {
        let at = |why: String| format!("schedule {}: {why}", i + 1);
        if schedule.time_zone.chars().count() > MAX_TIME_ZONE_CHARS {
            return Err(at(format!(
                "the time zone is longer than {MAX_TIME_ZONE_CHARS} characters"
            )));
        }
        dispatch_cron::Expr::parse(&schedule.expression, &schedule.time_zone).map_err(at)?;
        if schedule.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(at(format!(
                "the payload is {} bytes; at most {MAX_PAYLOAD_BYTES}",
                schedule.payload.len()
            )));
        }
    }
    if spec.interval_ms != 0 {
        let ms = u128::from(spec.interval_ms);
        if ms < dispatch_cron::MIN_EVERY.as_millis() || ms > dispatch_cron::MAX_EVERY.as_millis() {
            return Err("the interval must be from 1s to 366 days".into());
        }
    }
    if spec.listeners.len() > MAX_LISTENERS {
        return Err(format!(
            "{} listeners; at most {MAX_LISTENERS}",
            spec.listeners.len()
        ));
    }
    for (i, listener) in spec.listeners.iter().enumerate() {
        check_listener(listener).map_err(|why| format!("listener {}: {why}", i + 1))?;
    }
    Ok(())
}

/// The prefixes a listener's signing secret's name starts with: ingress, which faces
/// the internet, may read only those secrets.
pub const SIGNING_SECRET_PREFIXES: [&str; 2] = ["WEBHOOK_", "webhook-"];

/// Whether `name` may name a listener's signing secret.
pub fn is_signing_secret_name(name: &str) -> bool {
    SIGNING_SECRET_PREFIXES
        .iter()
        .any(|prefix| name.len() > prefix.len() && name.starts_with(prefix))
        && is_name(name, 64)
}

/// Checks one listener by the rules of [`check_spec`].
pub fn check_listener(listener: &Listener) -> Result<(), String> {
    match (listener.listen_addr.is_empty(), listener.hook.is_empty()) {
        (true, true) => return Err("it needs an address to listen on or a hook".into()),
        (false, false) => return Err("it has both an address and a hook; give one".into()),
        (false, true) => {
            listener.listen_addr.parse::<SocketAddr>().map_err(|_| {
                format!(
                    "`{}` is not an address to listen on (say `127.0.0.1:8088`, or port 0 \
                     for any free one)",
                    crate::slice_chars(&listener.listen_addr, 64)
                )
            })?;
        }
        (true, false) => check_hook(&listener.hook)?,
    }
    if !listener.path.is_empty() {
        let ok = listener.path.starts_with('/')
            && listener.path.chars().count() <= MAX_PATH_CHARS
            && listener.path.chars().all(|c| c.is_ascii_graphic())
            && !listener.path.contains(['?', '#']);
        if !ok {
            return Err(format!(
                "path {:?} must start with `/` and be at most {MAX_PATH_CHARS} visible ASCII \
                 characters, without `?` or `#`",
                crate::slice_chars(&listener.path, 64)
            ));
        }
    }
    if listener.methods.len() > MAX_METHODS {
        return Err(format!("at most {MAX_METHODS} methods"));
    }
    for method in &listener.methods {
        let ok = !method.is_empty()
            && method.len() <= 16
            && method.bytes().all(|b| b.is_ascii_uppercase());
        if !ok {
            return Err(format!(
                "method {:?} is not an HTTP method (say POST)",
                crate::slice_chars(method, 16)
            ));
        }
    }
    if !listener.secret_sha256.is_empty() && listener.secret_sha256.len() != 32 {
        return Err("the shared secret's digest is not a SHA-256".into());
    }
    if !listener.signing_secret.is_empty() && !is_signing_secret_name(&listener.signing_secret) {
        return Err(format!(
            "signing secret {:?} must be a secret name starting with `WEBHOOK_` or \
             `webhook-` (ingress reads no other secrets)",
            crate::slice_chars(&listener.signing_secret, 64)
        ));
    }
    if listener.max_body_bytes > MAX_BODY_BYTES {
        return Err(format!("max body bytes is at most {MAX_BODY_BYTES}"));
    }
    if listener.max_header_bytes > MAX_HEADER_BYTES {
        return Err(format!("max header bytes is at most {MAX_HEADER_BYTES}"));
    }
    Ok(())
}

/// Checks an `account/agent/channel` hook: three names, as `/hooks/{account}/{agent}/
/// {channel}` takes them.
pub fn check_hook(hook: &str) -> Result<(), String> {
    let parts: Vec<&str> = hook.split('/').collect();
    let ok = parts.len() == 3 && parts.iter().all(|p| is_name(p, 64));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "hook {:?} must be `account/agent/channel`, each a name of letters, digits, \
             `_` and `-` (at most 64)",
            crate::slice_chars(hook, 64)
        ))
    }
}

/// The key a service's `index`th listener (1-based) is kept under in the listeners
/// bucket.
pub fn listener_key(service: &RunId, index: u32) -> String {
    format!("{service}.{index}")
}

/// The key a hook (`account/agent/channel`, checked) is found under in the listeners
/// bucket.
pub fn hook_key(hook: &str) -> String {
    format!("hook.{}", hook.replace('/', "."))
}

fn is_name(text: &str, max: usize) -> bool {
    !text.is_empty()
        && text.len() <= max
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

/// Records in the service run `parent`'s log that it woke and started the run `wake`
/// names. Returns why not when the wake may not run: `parent` is not a service, the
/// wake is not of the service's own goal (or names a listener it has not), or the
/// service has ended. Safe to repeat: the event's id is made from the wake's run, so a
/// second append is dropped as a duplicate. It reads two events of the service's log,
/// not all of it, so a service's thousandth wake costs what its first did.
pub async fn record_wake(
    log: &RunLog,
    parent: RunId,
    wake: &SubmitGoal,
) -> Result<Result<(), String>, Error> {
    let child: RunId = match wake.run_id.parse() {
        Ok(child) => child,
        Err(e) => return Ok(Err(format!("the wake's run id: {e}"))),
    };
    let service = match log.first_event(&parent).await?.and_then(|e| e.event.body) {
        Some(Body::RunRequested(r)) if r.kind == KIND => r,
        _ => return Ok(Err(format!("run {parent} is not a service run"))),
    };
    // A wake runs the service's goal, in its conversation, with its budget: anything
    // else is some other goal wearing the service's name.
    let requested = crate::submit::requested(wake);
    let listeners = service.service.as_ref().map_or(0, |s| s.listeners.len());
    let listener_ok = match wake.wake.as_str() {
        WAKE_WEBHOOK => (1..=listeners).contains(&(wake.listener as usize)),
        _ => wake.listener == 0,
    };
    if requested.goal != service.goal
        || requested.conversation_id != service.conversation_id
        || requested.timeout_ms != service.timeout_ms
        || !listener_ok
    {
        return Ok(Err(format!(
            "the wake is not of service {parent}'s goal and sources"
        )));
    }
    let (reason, listener) = (wake.wake.as_str(), wake.listener);
    let mut tail = log.handle_tail(parent).await?;
    let body = Body::ServiceWoken(ServiceWoken {
        run_id: child.to_string(),
        wake: reason.to_owned(),
        listener,
    });
    loop {
        if tail.is_finished() {
            return Ok(Err(format!("its service run {parent} has ended")));
        }
        match tail
            .append_with_id(wake_event_id(&child), body.clone(), &child.to_string())
            .await
        {
            Ok(_) => return Ok(Ok(())),
            Err(e) if e.kind() == ErrorKind::Duplicate => return Ok(Ok(())),
            // Another wake (or the stop) got in first: the handle has read it; go again.
            Err(e) if e.kind() == ErrorKind::Conflict => {}
            Err(e) if e.kind() == ErrorKind::Finished => {
                return Ok(Err(format!("its service run {parent} has ended")));
            }
            Err(e) => return Err(e),
        }
    }
}

/// The id of the `ServiceWoken` event for `child`: a UUIDv7 with the child's time, so
/// every try of one wake has the same id.
fn wake_event_id(child: &RunId) -> String {
    let id = child.to_string();
    crate::derived_uuid(crate::uuid_millis(&id), &format!("{id}/woken")).to_string()
}

#[cfg(test)]
mod tests {
    use dispatch_proto::run::v1::ServiceSchedule;

    use super::*;

    fn listener(addr: &str) -> Listener {
        Listener {
            listen_addr: addr.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_well_formed_spec_passes() {
        let spec = ServiceSpec {
            source: "examples/Agentfile".into(),
            schedules: vec![ServiceSchedule {
                expression: "*/5 * * * * * *".into(),
                time_zone: "Europe/Lisbon".into(),
                payload: String::new(),
            }],
            interval_ms: 30_000,
            listeners: vec![
                Listener {
                    path: "/hook".into(),
                    methods: vec!["POST".into(), "PUT".into()],
                    secret_sha256: vec![0; 32],
                    ..listener("127.0.0.1:0")
                },
                Listener {
                    hook: "acme/triage/github".into(),
                    signing_secret: "WEBHOOK_GITHUB".into(),
                    ..Default::default()
                },
            ],
        };
        check_spec(&spec).unwrap();
        check_spec(&ServiceSpec::default()).unwrap();
    }

    #[test]
    fn each_bad_part_is_named() {
        let with = |f: &dyn Fn(&mut ServiceSpec)| {
            let mut spec = ServiceSpec::default();
            f(&mut spec);
            check_spec(&spec).unwrap_err()
        };
        let cases: Vec<(String, &str)> = vec![
            (
                with(&|s| {
                    s.schedules.push(ServiceSchedule {
                        expression: "61 * * * *".into(),
                        ..Default::default()
                    })
                }),
                "schedule 1: `61 * * * *` is not a cron expression",
            ),
            (with(&|s| s.interval_ms = 10), "interval must be from 1s"),
            (
                with(&|s| s.listeners.push(listener("localhost"))),
                "listener 1: `localhost` is not an address",
            ),
            (
                with(&|s| s.listeners.push(Listener::default())),
                "needs an address to listen on or a hook",
            ),
            (
                with(&|s| {
                    s.listeners.push(Listener {
                        hook: "acme/../x".into(),
                        ..Default::default()
                    })
                }),
                "must be `account/agent/channel`",
            ),
            (
                with(&|s| {
                    s.listeners.push(Listener {
                        path: "hook".into(),
                        ..listener("127.0.0.1:0")
                    })
                }),
                "must start with `/`",
            ),
            (
                with(&|s| {
                    s.listeners.push(Listener {
                        methods: vec!["post".into()],
                        ..listener("127.0.0.1:0")
                    })
                }),
                "not an HTTP method",
            ),
            (
                with(&|s| {
                    s.listeners.push(Listener {
                        secret_sha256: vec![1; 5],
                        ..listener("127.0.0.1:0")
                    })
                }),
                "not a SHA-256",
            ),
            (
                with(&|s| {
                    s.listeners.push(Listener {
                        max_body_bytes: MAX_BODY_BYTES + 1,
                        ..listener("127.0.0.1:0")
                    })
                }),
                "max body bytes",
            ),
            (
                with(&|s| s.schedules = vec![ServiceSchedule::default(); MAX_SCHEDULES + 1]),
                "at most 16",
            ),
        ];
        for (error, said) in cases {
            assert!(error.contains(said), "{said:?} not in {error:?}");
        }
    }
}
