use super::*;

fn call<'a>(tool: &'a str, args_json: &'a str, risk: Risk) -> Call<'a> {
    Call {
        tool,
        args_json,
        risk,
        origin: "cli",
    }
}

fn effect(doc: &Document, c: Call<'_>) -> Effect {
    doc.decide(c).effect
}

#[test]
fn the_builtin_policy_allows_reads_and_scratch_writes_and_asks_for_the_rest() {
    let doc = Document::builtin();
    let read = |tool, args| effect(&doc, call(tool, args, Risk::Read));
    let write = |tool, args| effect(&doc, call(tool, args, Risk::Write));
    assert_eq!(
        read("files.read_file", r#"{"path":"/etc/passwd"}"#),
        Effect::Allow
    );
    assert_eq!(read("time.now", "{}"), Effect::Allow);
    assert_eq!(
        write("files.write_file", r#"{"path":"scratch/x/y.org"}"#),
        Effect::Allow
    );
    assert_eq!(
        write("files.write_file", r#"{"path":"./scratch//a"}"#),
        Effect::Allow
    );
    for outside in [
        r#"{"path":"../../etc/passwd"}"#,
        r#"{"path":"scratch/../../x"}"#,
        r#"{"path":"/tmp/x"}"#,
        r#"{"path":"TASKS.org"}"#,
        r#"{"path":"scratchy/x"}"#,
        r#"{"path":7}"#,
        r#"{"source":"scratch/a","destination":"/etc/a"}"#,
        "{}",
        "not json",
    ] {
        assert_eq!(write("files.write_file", outside), Effect::Ask, "{outside}");
    }
    let verdict = doc.decide(call(
        "files.write_file",
        r#"{"path":"/etc/x"}"#,
        Risk::Write,
    ));
    assert_eq!(verdict.rule, DEFAULT_RULE);
    assert!(verdict.reason.contains("scratch/"), "{}", verdict.reason);
    for risk in [Risk::Destructive, Risk::External] {
        let verdict = doc.decide(call("mail.send", "{}", risk));
        assert_eq!(
            (verdict.effect, verdict.rule.as_str()),
            (Effect::Ask, "risky")
        );
    }
}

#[test]
fn rules_match_on_tool_risk_origin_and_arguments() {
    let doc = Document::parse(
        r#"{"default": "deny", "rules": [
            {"name": "no-moves", "effect": "deny", "tools": ["fs.move_file"]},
            {"name": "shared", "effect": "allow", "tools": ["fs.*"], "when": {"path_prefix": ["/srv/shared/"]}},
            {"name": "cron-mail", "effect": "validate", "tools": ["mail.send"], "origin": ["cron"]},
            {"name": "api", "effect": "allow", "risk": ["external"], "when": {"url_host": ["api.example.com", "*.internal.example"]}},
            {"name": "destroy", "effect": "ask", "risk": ["destructive"], "approval_ttl_ms": 60000}
        ]}"#,
    )
    .unwrap();
    let fs = |args| effect(&doc, call("fs.write_file", args, Risk::Write));
    assert_eq!(fs(r#"{"path":"/srv/shared/a.txt"}"#), Effect::Allow);
    assert_eq!(fs(r#"{"path":"/srv/shared"}"#), Effect::Allow);
    assert_eq!(fs(r#"{"path":"/srv/shared/../secret"}"#), Effect::Deny);
    assert_eq!(fs(r#"{"path":"/srv/sharedx/a"}"#), Effect::Deny);
    assert_eq!(
        fs(r#"{"paths":["/srv/shared/a","/srv/shared/b"]}"#),
        Effect::Allow
    );
    assert_eq!(fs(r#"{"paths":["/srv/shared/a","/etc/b"]}"#), Effect::Deny);
    assert_eq!(
        effect(
            &doc,
            call("fs.move_file", r#"{"source":"/srv/shared/a"}"#, Risk::Write)
        ),
        Effect::Deny
    );
    let mail = |origin| {
        doc.decide(Call {
            tool: "mail.send",
            args_json: "{}",
            risk: Risk::Write,
            origin,
        })
        .effect
    };
    assert_eq!(mail("cron"), Effect::Validate);
    assert_eq!(mail("cli"), Effect::Deny);
    let http = |url: &str| {
        let args = serde_json::json!({ "method": "POST", "url": url }).to_string();
        effect(&doc, call("http.request", &args, Risk::External))
    };
    assert_eq!(http("https://api.example.com/v1/x"), Effect::Allow);
    assert_eq!(http("https://API.example.com/"), Effect::Allow);
    assert_eq!(http("https://a.internal.example/"), Effect::Allow);
    assert_eq!(http("https://internal.example/"), Effect::Deny);
    assert_eq!(http("https://evilinternal.example/"), Effect::Deny);
    assert_eq!(http("https://api.example.com.evil.net/"), Effect::Deny);
    assert_eq!(http("ftp://api.example.com/"), Effect::Deny);
    assert_eq!(http("https://user@evil.net/@api.example.com"), Effect::Deny);
    let verdict = doc.decide(call("fs.delete", "{}", Risk::Destructive));
    assert_eq!(verdict.effect, Effect::Ask);
    assert_eq!(verdict.approval_ttl_ms, Some(60_000));
}

#[test]
fn a_tool_s_standing_is_what_no_call_can_change() {
    let doc = Document::parse(
        r#"{"default": "deny", "rules": [
            {"name": "no-moves", "effect": "deny", "tools": ["fs.move_file"]},
            {"name": "no-outside", "effect": "deny", "tools": ["fs.*"], "origin": ["cron"]},
            {"name": "fs-reads", "effect": "allow", "tools": ["fs.*"], "when": {"path_prefix": ["scratch"]}},
            {"name": "clock", "effect": "allow", "tools": ["time.*"]},
            {"name": "web", "effect": "ask", "risk": ["external"]}
        ]}"#,
    )
    .unwrap();
    let standing = |tool, risks: &[Risk]| {
        let s = doc.standing(tool, risks);
        (s.effect, s.rule)
    };
    assert_eq!(
        standing("fs.move_file", &[Risk::Write]),
        (Some(Effect::Deny), "no-moves".into())
    );
    assert_eq!(
        standing("fs.read_file", &[Risk::Read]),
        (None, "fs-reads".into())
    );
    assert_eq!(
        standing("time.now", &[Risk::Read]),
        (Some(Effect::Allow), "clock".into())
    );
    assert_eq!(
        standing("http.request", &[Risk::External]),
        (Some(Effect::Ask), "web".into())
    );
    // Some of its calls are reads, which no rule allows: it depends.
    assert_eq!(
        standing("http.request", &[Risk::External, Risk::Read]),
        (None, "web".into())
    );
    assert_eq!(
        standing("fsx.read_file", &[Risk::Read]),
        (Some(Effect::Deny), DEFAULT_RULE.into())
    );
}

#[test]
fn bad_documents_are_refused_with_where_and_why() {
    let refused = |text: &str| Document::parse(text).unwrap_err().to_string();
    let err = refused("{\n  \"default\": \"deny\",\n  \"rules\": [],\n  \"extra\": 1\n}");
    assert!(
        err.contains("unknown field `extra`") && err.contains("line 4"),
        "{err}"
    );
    let err = refused(
        "{\"default\": \"deny\", \"rules\": [\n  {\"name\": \"a\", \"effect\": \"allow\"},\n  {\"name\": \"b\", \"effect\": \"allow\", \"tools\": [\"no dots\"]}\n]}",
    );
    assert!(
        err.contains("rule 2 \"b\" at line 3") && err.contains("no dots"),
        "{err}"
    );
    let err = refused(r#"{"default": "maybe", "rules": []}"#);
    assert!(err.contains("unknown variant `maybe`"), "{err}");
    let err = refused(
        r#"{"default": "deny", "rules": [{"name": "x", "effect": "allow", "risk": ["scary"]}]}"#,
    );
    assert!(err.contains("scary"), "{err}");
    let err = refused(
        r#"{"default": "deny", "rules": [{"name": "x", "effect": "allow", "when": {"path_prefix": ["../up"]}}]}"#,
    );
    assert!(err.contains("'..'"), "{err}");
    let err = refused(
        r#"{"default": "deny", "rules": [{"name": "x", "effect": "allow", "when": {"url_host": ["a b"]}}]}"#,
    );
    assert!(err.contains("a b"), "{err}");
    let err = refused(
        r#"{"default": "deny", "rules": [{"name": "x", "effect": "allow"}, {"name": "x", "effect": "deny"}]}"#,
    );
    assert!(err.contains("both named \"x\""), "{err}");
    let err = refused(r#"{"default": "deny", "rules": [{"name": "default", "effect": "allow"}]}"#);
    assert!(err.contains("uses itself"), "{err}");
    let err = refused(
        r#"{"default": "deny", "rules": [{"name": "x", "effect": "ask", "approval_ttl_ms": 0}]}"#,
    );
    assert!(err.contains("approval_ttl_ms"), "{err}");
    let err = refused(&format!(
        "{{\"default\": \"deny\", \"rules\": [], \"guidance\": \"{}\"}}",
        "x".repeat(MAX_DOCUMENT_BYTES)
    ));
    assert!(err.contains("at most"), "{err}");
    assert!(refused("[").contains("line 1"));
}

#[test]
fn a_version_is_its_content() {
    let doc = Document::builtin();
    let again = Document::parse(&doc.to_json()).unwrap();
    assert_eq!(doc, again);
    assert_eq!(doc.hash(), again.hash());
    assert!(doc.hash().starts_with("sha256:") && doc.hash().len() == 7 + 64);
    // The same rules written differently are the same version.
    let a = Document::parse(r#"{"rules": [{"name": "r", "effect": "allow"}], "default": "deny"}"#)
        .unwrap();
    let b = Document::parse(
        "{\"default\":\"deny\",\n \"rules\":[{\"effect\":\"allow\",\"name\":\"r\",\"tools\":[]}]}",
    )
    .unwrap();
    assert_eq!(a.hash(), b.hash());
    let c = Document::parse(r#"{"rules": [{"name": "r", "effect": "ask"}], "default": "deny"}"#)
        .unwrap();
    assert_ne!(a.hash(), c.hash());
}
