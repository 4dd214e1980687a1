//! MAIL_TO params: what a mail task carries, and their validation at submit.

use super::TaskError;
use lettre::message::Mailbox;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest subject accepted, in bytes.
const MAX_TITLE: usize = 998;
/// Most recipients in one mail.
const MAX_RECIPIENTS: usize = 100;

/// Mail params as stored with the task (sender resolved at submit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MailParams {
    /// The sender (the task's, or `--smtp_from`).
    pub(crate) from_addr: String,
    /// Comma-separated recipients.
    pub(crate) to_addr: String,
    /// The subject: one line.
    pub(crate) title: String,
    /// The plain-text body.
    pub(crate) body: String,
}

/// What MAIL_TO params must be.
const SHAPE: &str = "for MAIL_TO must be a JSON object {from_addr,to_addr,title,body}";

/// Validates MAIL_TO params (a JSON object or a JSON string holding one) into stored params.
/// Errors name the field at fault.
pub(crate) fn parse_params(
    name: &str,
    raw: Option<&Value>,
    default_from: Option<&str>,
) -> Result<MailParams, TaskError> {
    let obj = match raw {
        Some(Value::Object(o)) => o.clone(),
        Some(Value::String(s)) => match serde_json::from_slice::<Value>(s.as_bytes()) {
            Ok(Value::Object(o)) => o,
            _ => return Err(TaskError::field("params", SHAPE)),
        },
        _ => return Err(TaskError::field("params", SHAPE)),
    };
    const KEYS: [&str; 4] = ["from_addr", "to_addr", "title", "body"];
    if let Some((key, like)) = super::parse::unknown_key(&obj, &KEYS) {
        let problem = match like {
            Some(k) => format!("unknown field {key:?} (did you mean {k:?}?)"),
            None => format!("unknown field {key:?} ({SHAPE})"),
        };
        return Err(TaskError::field("params", problem));
    }
    let text = |field: &'static str| -> Result<Option<String>, TaskError> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(TaskError::field(field, "must be a string")),
        }
    };
    let from_addr = match text("from_addr")?.filter(|s| !s.trim().is_empty()) {
        Some(f) => f,
        None => default_from.map(str::to_string).ok_or_else(|| {
            TaskError::field(
                "from_addr",
                "is required (or start poulpe with --smtp_from)",
            )
        })?,
    };
    from_addr.trim().parse::<Mailbox>().map_err(|e| {
        TaskError::field(
            "from_addr",
            format!("{from_addr:?} is not a mail address: {e}"),
        )
    })?;
    let to_addr = match text("to_addr")?.filter(|s| !s.trim().is_empty()) {
        Some(t) => t,
        None => name.to_string(),
    };
    let to = recipients(&to_addr).map_err(|e| TaskError::field("to_addr", e))?;
    if to.len() > MAX_RECIPIENTS {
        return Err(TaskError::field(
            "to_addr",
            format!("at most {MAX_RECIPIENTS} recipients"),
        ));
    }
    let title = text("title")?.unwrap_or_default();
    if title.len() > MAX_TITLE || title.contains(['\r', '\n']) {
        return Err(TaskError::field(
            "title",
            format!("must be one line of at most {MAX_TITLE} bytes"),
        ));
    }
    let body = text("body")?.unwrap_or_default();
    Ok(MailParams {
        from_addr: from_addr.trim().to_string(),
        to_addr,
        title,
        body,
    })
}

/// Parses a comma-separated recipient list (at submit, and again when the mail is built).
pub(crate) fn recipients(list: &str) -> Result<Vec<Mailbox>, String> {
    let out: Vec<Mailbox> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|a| {
            a.parse::<Mailbox>()
                .map_err(|e| format!("{a:?} is not a mail address: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if out.is_empty() {
        return Err("no recipient (give to_addr, or the address as name)".into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The field a refusal names.
    fn field(e: TaskError) -> &'static str {
        match e {
            TaskError::Field { field, .. } => field,
            TaskError::NotAnObject | TaskError::Unknown { .. } => "(not a field of params)",
        }
    }

    #[test]
    fn an_internationalized_domain_is_taken_as_written_or_in_its_ascii_form() {
        // The binary carries no Unicode tables for domain names (idna_adapter 1.0, see
        // Cargo.toml): mail addresses must not need them.
        assert!(recipients("ops@xn--bcher-kva.example").is_ok());
        assert!(recipients("ops@b\u{fc}cher.example").is_ok());
        assert!(recipients("j\u{f6}rg@b\u{fc}cher.example").is_ok());
    }

    #[test]
    fn params_are_validated_with_field_names() {
        let p = parse_params(
            "a@x.org",
            Some(&json!({"title":"Hi","body":"b"})),
            Some("me@x.org"),
        )
        .expect("valid");
        assert_eq!(p.to_addr, "a@x.org");
        assert_eq!(p.from_addr, "me@x.org");
        let p = parse_params(
            "ignored",
            Some(&json!("{\"from_addr\":\"F <f@x.org>\",\"to_addr\":\"a@x.org, b@y.org\",\"title\":\"Été\",\"body\":\"x\"}")),
            None,
        )
        .expect("valid string form");
        assert_eq!(recipients(&p.to_addr).expect("two").len(), 2);
        let bad = |name: &str, v: Value, from: Option<&str>| {
            field(parse_params(name, Some(&v), from).unwrap_err())
        };
        assert_eq!(bad("a@x.org", json!({"body":"b"}), None), "from_addr");
        assert_eq!(
            bad("a@x.org", json!({"from_addr":"nope"}), None),
            "from_addr"
        );
        assert_eq!(bad("not an address", json!({}), Some("f@x.org")), "to_addr");
        assert_eq!(
            bad("a@x.org", json!({"to_addr":"a@x.org,bad"}), Some("f@x.org")),
            "to_addr"
        );
        assert_eq!(
            bad(
                "a@x.org",
                json!({"title":"a\r\nBcc: evil@x.org"}),
                Some("f@x.org")
            ),
            "title"
        );
        assert_eq!(bad("a@x.org", json!({"body":5}), Some("f@x.org")), "body");
        assert_eq!(
            field(parse_params("a@x.org", Some(&json!([1])), None).unwrap_err()),
            "params"
        );
        assert_eq!(
            field(parse_params("a@x.org", None, None).unwrap_err()),
            "params"
        );
    }

    /// A key that is not one of the four is refused (a typo would drop the subject silently),
    /// naming the one it resembles; the cron file's MAIL_TO lines go through here too.
    #[test]
    fn unknown_keys_are_refused_with_the_key_they_resemble() {
        let err = parse_params(
            "a@x.org",
            Some(&json!({"tile":"Hi","body":"b"})),
            Some("me@x.org"),
        )
        .expect_err("refused");
        assert_eq!(
            err.to_string(),
            r#"params: unknown field "tile" (did you mean "title"?)"#
        );
        let err = parse_params(
            "a@x.org",
            Some(&json!({"priority":"high"})),
            Some("me@x.org"),
        )
        .expect_err("refused");
        assert!(
            err.to_string().contains("{from_addr,to_addr,title,body}"),
            "{err}"
        );
    }
}
