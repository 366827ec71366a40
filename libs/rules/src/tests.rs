use super::*;

fn call<'a>(tool: &'a str, args_json: &'a str, risk: Risk) -> Call<'a> {
    Call {
        tool,
        args_json,
        risk,
        origin: "cli",
        schema: None,
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
        write("files.write_file", r#"{"path":"scratch//a/"}"#),
        Effect::Allow
    );
    for outside in [
        r#"{"path":"./scratch/a"}"#,
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

/// `scratch/` is the run's own only to the built-in files connector: the filesystem MCP
/// server resolves the same relative path in its shared folder, so the built-in
/// `run-writes` allows none of its calls, and a rule may name the connectors it means.
#[test]
fn a_relative_prefix_speaks_only_for_the_connectors_that_read_it_in_the_run() {
    let doc = Document::builtin();
    let write = |tool, args| doc.decide(call(tool, args, Risk::Write));
    let ours = write("files.write_file", r#"{"path":"scratch/REPORT.org"}"#);
    assert_eq!(
        (ours.effect, ours.rule.as_str()),
        (Effect::Allow, "run-writes")
    );
    let theirs = write("fs.create_directory", r#"{"path":"scratch/REPORT.org"}"#);
    assert_eq!(
        (theirs.effect, theirs.rule.as_str()),
        (Effect::Ask, DEFAULT_RULE)
    );
    assert!(
        theirs
            .reason
            .contains("a relative path is the run's own only for the files connector's tools"),
        "{}",
        theirs.reason
    );

    let named = Document::parse(
        r#"{"default": "ask", "rules": [
            {"name": "shared", "effect": "allow", "risk": ["write"],
             "when": {"path_prefix": ["scratch/", "/srv/shared/"], "path_connectors": ["fs"]}},
            {"name": "no-scratch", "effect": "deny", "tools": ["files.*"],
             "when": {"path_prefix": ["scratch/secret/"], "path_connectors": ["fs"]}}
        ]}"#,
    )
    .unwrap();
    let decide = |tool, args| named.decide(call(tool, args, Risk::Write)).effect;
    assert_eq!(
        decide("fs.write_file", r#"{"path":"scratch/a"}"#),
        Effect::Allow
    );
    // Named, fs speaks for the prefix, and files no longer does.
    assert_eq!(
        decide("files.write_file", r#"{"path":"scratch/a"}"#),
        Effect::Ask
    );
    // An absolute prefix speaks for every connector.
    assert_eq!(
        decide("files.write_file", r#"{"path":"/srv/shared/a"}"#),
        Effect::Allow
    );
    // What stops a call reads every prefix for every connector.
    assert_eq!(
        decide("files.write_file", r#"{"path":"scratch/secret/a"}"#),
        Effect::Deny
    );

    let refused = |text: &str| Document::parse(text).unwrap_err().to_string();
    let err = refused(
        r#"{"default": "deny", "rules": [{"name": "x", "effect": "allow", "when": {"path_prefix": ["/srv/"], "path_connectors": ["fs"]}}]}"#,
    );
    assert!(err.contains("no relative path_prefix"), "{err}");
    let err = refused(
        r#"{"default": "deny", "rules": [{"name": "x", "effect": "allow", "when": {"path_prefix": ["scratch/"], "path_connectors": ["f s"]}}]}"#,
    );
    assert!(err.contains("connector's name"), "{err}");
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
            schema: None,
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
    for host in ["a b", "*.1.2.3.4", "\u{e9}.example", "h:80"] {
        let err = refused(&format!(
            r#"{{"default": "deny", "rules": [{{"name": "x", "effect": "allow", "when": {{"url_host": [{}]}}}}]}}"#,
            serde_json::to_string(host).unwrap()
        ));
        assert!(err.contains("is not a host name"), "{host}: {err}");
    }
    let err = refused(
        r#"{"default": "deny", "rules": [{"name": "x", "effect": "allow", "when": {"path_prefix": ["a\\b"]}}]}"#,
    );
    assert!(err.contains("backslash"), "{err}");
    let err = refused(
        r#"{"default": "deny", "rules": [{"name": "x", "effect": "allow"}, {"name": "x", "effect": "deny"}]}"#,
    );
    assert!(err.contains("both named \"x\""), "{err}");
    for name in ["default", "gate", "arguments"] {
        let err = refused(&format!(
            r#"{{"default": "deny", "rules": [{{"name": "{name}", "effect": "allow"}}]}}"#
        ));
        assert!(err.contains("uses itself"), "{err}");
    }
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

/// The schema of the built-in `files.write_file`: `path` marked a path.
fn write_file_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "path": {"type": "string", "format": "path"},
            "content": {"type": "string"}
        },
        "required": ["path", "content"],
        "additionalProperties": false
    })
}

/// An editing tool's schema as the Python SDK writes it: nested models by `$ref`.
fn edit_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "path": {"type": "string", "format": "path"},
            "edits": {"type": "array", "items": {"$ref": "#/$defs/Edit"}}
        },
        "$defs": {"Edit": {"type": "object", "properties": {
            "path": {"type": "string", "format": "path"},
            "oldText": {"type": "string"},
            "newText": {"type": "string"}
        }}}
    })
}

fn decide_with(
    doc: &Document,
    tool: &str,
    args: &serde_json::Value,
    risk: Risk,
    schema: Option<&serde_json::Value>,
) -> Verdict {
    let args = args.to_string();
    doc.decide(Call {
        tool,
        args_json: &args,
        risk,
        origin: "cli",
        schema,
    })
}

#[test]
fn a_scratch_write_is_allowed_only_when_every_path_it_names_plainly_is_in_scratch() {
    use serde_json::json;
    let doc = Document::builtin();
    let write = write_file_schema();
    let edit = edit_schema();
    let long = format!("scratch/{}", "a/".repeat(3000));
    let cases: Vec<(serde_json::Value, Option<&serde_json::Value>, Effect)> = vec![
        // What the run-writes rule is for keeps working; content is not a path when
        // the schema says which argument is.
        (
            json!({"path": "scratch/ok.txt", "content": "hi\n../../etc"}),
            Some(&write),
            Effect::Allow,
        ),
        (
            json!({"path": "scratch//notes/a.org", "content": "x"}),
            Some(&write),
            Effect::Allow,
        ),
        (
            json!({"path": "scratch/a b%20c.txt", "content": "x"}),
            Some(&write),
            Effect::Allow,
        ),
        (
            json!({"path": "scratch/r\u{e9}sum\u{e9}.org", "content": "x"}),
            Some(&write),
            Effect::Allow,
        ),
        (
            json!({"path": "scratch/a", "edits": [{"path": "scratch/b", "oldText": "/etc", "newText": "y"}]}),
            Some(&edit),
            Effect::Allow,
        ),
        // Another argument naming a path elsewhere: undeclared, by another name, nested.
        (
            json!({"path": "scratch/ok.txt", "target": "/etc/shadow"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/ok.txt", "target": "/etc/shadow"}),
            None,
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/ok.txt", "content": "x", "dest": "TASKS.org"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/ok.txt", "dest": "scratch/../TASKS.org"}),
            None,
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/a", "edits": [{"path": "/etc/passwd", "oldText": "x", "newText": "y"}]}),
            Some(&edit),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/a", "edits": [{"path": "/etc/passwd"}]}),
            None,
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/a", "edits": [{"path": "scratch/b", "to": "/etc/x"}]}),
            Some(&edit),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/a", "extra": {"/etc/x": "scratch/b"}}),
            Some(&write),
            Effect::Ask,
        ),
        // Without a schema every string is a path, content too.
        (
            json!({"path": "scratch/ok.txt", "content": "hello"}),
            None,
            Effect::Ask,
        ),
        // Encodings, separators, steps, absolute paths, lookalikes, control characters.
        (
            json!({"path": "scratch/%2e%2e/%2e%2e/etc/passwd", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/%252e%252e/x", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch%2f..%2f..%2fx", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch%2fa", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/\\..\\..\\x", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/%5c..%5cx", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "./scratch/a", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/./a", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/../../x", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "/tmp/run/scratch/a", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch\u{ff0f}..\u{ff0f}x", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/\u{2024}\u{2024}/x", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch\u{2215}..\u{2215}x", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/a\u{0}.txt", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": "scratch/%ff", "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": ["scratch/a"], "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (
            json!({"path": 7, "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
        (json!({"content": "x"}), Some(&write), Effect::Ask),
        (
            json!({"path": long, "content": "x"}),
            Some(&write),
            Effect::Ask,
        ),
    ];
    for (args, schema, expect) in cases {
        let got = decide_with(&doc, "files.write_file", &args, Risk::Write, schema).effect;
        assert_eq!(got, expect, "{args} (schema: {})", schema.is_some());
    }
    assert_eq!(
        doc.decide(call("files.write_file", "not json", Risk::Write))
            .effect,
        Effect::Ask
    );
}

#[test]
fn a_rule_that_stops_a_path_stops_it_however_it_is_written() {
    use serde_json::json;
    let doc = Document::parse(
        r#"{"default": "ask", "rules": [
            {"name": "no-etc", "effect": "deny", "when": {"path_prefix": ["/etc/"]}},
            {"name": "anything-else", "effect": "allow", "tools": ["fs.*"]}
        ]}"#,
    )
    .unwrap();
    let write = write_file_schema();
    for args in [
        json!({"path": "/etc/shadow", "content": "x"}),
        json!({"path": "/tmp/../etc/shadow", "content": "x"}),
        json!({"path": "/tmp/%2e%2e/etc/shadow", "content": "x"}),
        json!({"path": "/tmp/%252e%252e/etc/shadow", "content": "x"}),
        json!({"path": "\\etc\\shadow", "content": "x"}),
        json!({"path": "\u{ff0f}etc\u{ff0f}shadow", "content": "x"}),
        json!({"path": "../../../x", "content": "x"}),
        json!({"path": "/srv/a", "target": "/etc/cron.d/x"}),
        json!({"path": "/srv/a", "edits": [{"path": "/etc/x"}]}),
        json!({"path": {"p": "/srv/a"}, "content": "x"}),
    ] {
        let verdict = decide_with(&doc, "fs.write_file", &args, Risk::Write, Some(&write));
        assert_eq!(
            (verdict.effect, verdict.rule.as_str()),
            (Effect::Deny, "no-etc"),
            "{args}"
        );
    }
    assert_eq!(
        doc.decide(call("fs.write_file", "not json", Risk::Write))
            .effect,
        Effect::Deny
    );
    for args in [
        json!({"path": "/srv/a", "content": "see /etc/passwd\n"}),
        json!({"path": "/srv/etc/x", "content": "x"}),
        json!({"path": "/etcetera", "content": "x"}),
    ] {
        let got = decide_with(&doc, "fs.write_file", &args, Risk::Write, Some(&write)).effect;
        assert_eq!(got, Effect::Allow, "{args}");
    }
}

#[test]
fn url_hosts_match_after_normalising_and_tricks_are_refused() {
    use serde_json::json;
    let doc = Document::parse(
        r#"{"default": "deny", "rules": [
            {"name": "no-metadata", "effect": "deny", "when": {"url_host": ["169.254.169.254", "metadata.google.internal"]}},
            {"name": "api", "effect": "allow", "tools": ["http.request"], "when": {"url_host": ["api.example.com", "127.0.0.1", "*.internal.example"]}}
        ]}"#,
    )
    .unwrap();
    let schema = json!({
        "type": "object",
        "properties": {
            "method": {"type": "string"},
            "url": {"type": "string", "format": "uri"},
            "headers": {"type": "object", "additionalProperties": {"type": "string"}},
            "body": {"type": "string"}
        },
        "additionalProperties": false
    });
    let http = |args: serde_json::Value, schema: Option<&serde_json::Value>| {
        decide_with(&doc, "http.request", &args, Risk::External, schema).effect
    };
    let get = |url: &str| json!({"method": "GET", "url": url});
    for url in [
        "https://api.example.com/v1",
        "https://API.example.com./v1",
        "http://127.0.0.1:8080/",
        "http://[::ffff:127.0.0.1]/",
        "http://2130706433/",
        "http://0x7f.0.0.1/",
        "https://a.internal.example./",
    ] {
        assert_eq!(http(get(url), Some(&schema)), Effect::Allow, "{url}");
        assert_eq!(
            http(get(url), None),
            Effect::Allow,
            "{url} without a schema"
        );
    }
    // A body that mentions another host is not where the request goes, when the
    // schema says which argument the URL is.
    let posted =
        json!({"method": "POST", "url": "https://api.example.com/", "body": "https://evil.net/"});
    assert_eq!(http(posted.clone(), Some(&schema)), Effect::Allow);
    assert_eq!(
        http(posted, None),
        Effect::Deny,
        "without a schema every URL counts"
    );
    for url in [
        "https://api.example.com.evil.net/",
        "https://api.example.com\\@evil.net/",
        "https://api.example.com@evil.net/",
        "https://evil.net#@api.example.com",
        "https://api%2eexample.com/",
        "https://api.exam\tple.com/",
        "https://api.example.com /",
        "https://\u{ff41}pi.example.com/",
        "https:api.example.com",
        "https:\\\\api.example.com",
        "ftp://api.example.com/",
        "https://internal.example/",
        "https://api.example.com../",
        "api.example.com/v1",
    ] {
        assert_eq!(http(get(url), Some(&schema)), Effect::Deny, "{url}");
    }
    let two = json!({"method": "GET", "url": "https://api.example.com/", "callback": "https://evil.net/"});
    assert_eq!(http(two, Some(&schema)), Effect::Deny);
    let nested = json!({"method": "GET", "url": "https://api.example.com/", "extra": [{"u": "//evil.net/x"}]});
    assert_eq!(http(nested, None), Effect::Deny);
    // The metadata service, however it is written, in any argument.
    for url in [
        "http://169.254.169.254/latest",
        "http://2852039166/",
        "http://0xa9.0xfe.0xa9.0xfe/",
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://169.254.169.254./",
        "http://api.example.com\\@169.254.169.254/",
        "169.254.169.254/latest",
        "http://metadata.google.internal./",
        "http://METADATA.google.internal/",
    ] {
        let verdict = decide_with(
            &doc,
            "fetch.get",
            &json!({"link": url}),
            Risk::External,
            None,
        );
        assert_eq!(
            (verdict.effect, verdict.rule.as_str()),
            (Effect::Deny, "no-metadata"),
            "{url}"
        );
    }
}
