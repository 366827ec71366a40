use std::time::Duration;

use super::*;

fn key_in(dir: &Path) -> Key {
    Key::load_or_create(&dir.join("keys").join("secrets.key")).unwrap()
}

#[test]
fn a_sealed_value_opens_only_under_its_name_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_in(dir.path());
    let sealed = key.seal("github", "ghp_planted-value");
    assert!(
        !sealed.windows(b"planted".len()).any(|w| w == b"planted"),
        "the value is in the clear"
    );
    assert_eq!(
        key.open("github", &sealed).unwrap().as_str(),
        "ghp_planted-value"
    );
    // Moved under another name, altered, or opened with another key: refused.
    assert!(matches!(
        key.open("gitlab", &sealed),
        Err(Error::Unsealable(_))
    ));
    let mut altered = sealed.clone();
    *altered.last_mut().unwrap() ^= 1;
    assert!(key.open("github", &altered).is_err());
    assert!(key.open("github", &[]).is_err());
    assert!(key.open("github", &[2; 64]).is_err());
    let other = tempfile::tempdir().unwrap();
    assert!(key_in(other.path()).open("github", &sealed).is_err());
    // The same key comes back from the file.
    let again = key_in(dir.path());
    assert_eq!(
        again.open("github", &sealed).unwrap().as_str(),
        "ghp_planted-value"
    );
    assert_eq!(format!("{again:?}"), "Key(********)");
}

#[test]
fn a_key_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secrets.key");
    Key::load_or_create(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Key::load(&path).unwrap_err().to_string();
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&path, "not hex").unwrap();
    assert!(Key::load(&path).unwrap_err().to_string().contains("hex"));
    assert!(Key::load(&dir.path().join("none")).unwrap().is_none());
}

#[test]
fn names_and_values_are_checked() {
    for good in ["github", "API_token-2", "a"] {
        check_name(good).unwrap();
    }
    for bad in ["", "2fa", "a.b", "a b", "ä", &"x".repeat(65), "*"] {
        assert!(check_name(bad).is_err(), "{bad}");
    }
    check_value("n", "sk-1234").unwrap();
    for bad in ["", "abc", "with\nnewline", &"x".repeat(MAX_VALUE_BYTES + 1)] {
        assert!(check_value("n", bad).is_err(), "{bad:?}");
    }
    assert_eq!(env_var("api-token"), "DISPATCH_SECRET_API_TOKEN");
}

#[test]
fn scrubbing_masks_every_occurrence_and_nothing_else() {
    let text = "Authorization: Bearer sk-planted\nagain sk-planted; sk-plant.";
    assert_eq!(
        scrub(text, ["sk-planted"]),
        "Authorization: Bearer ********\nagain ********; sk-plant."
    );
    assert_eq!(scrub("a b c", ["a"]), "a b c", "too short to look for");
    // Cut off at the end of the text (a size limit): the start is masked too.
    assert_eq!(scrub("token: sk-pla", ["sk-planted"]), "token: ********");
    assert_eq!(scrub("token: sk-", ["sk-planted"]), "token: sk-", "3 bytes");
}

#[test]
fn scrubbing_finds_a_secret_in_the_forms_it_is_passed_on_in() {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let secret = "sk-Planted?Value/42~";
    let b64 = |text: &str| STANDARD.encode(text);
    let cases = [
        secret.to_owned(),
        secret.to_uppercase(),
        secret.to_lowercase(),
        hex::encode(secret),
        hex::encode_upper(secret),
        secret.bytes().map(|b| format!("%{b:02x}")).collect(),
        secret.bytes().map(|b| format!("%{b:02X}")).collect(),
        b64(secret),
        URL_SAFE_NO_PAD.encode(secret),
        // Inside a longer base64 text, at each alignment: Basic auth, a JSON blob.
        b64(&format!("user:{secret}")),
        b64(&format!("u:{secret}")),
        b64(&format!("{{\"token\": \"{secret}\", \"n\": 1}}")),
        URL_SAFE_NO_PAD.encode(format!("ab{secret}cd")),
    ];
    for form in cases {
        let text = format!("before {form} after");
        let scrubbed = scrub(&text, [secret]);
        assert!(scrubbed.contains(MASK), "{form}: {scrubbed}");
        assert!(
            scrubbed.starts_with("before ") && scrubbed.ends_with(" after"),
            "{scrubbed}"
        );
        // What is left of a base64 form decodes to nothing of the secret.
        for word in scrubbed.split([' ', '*']) {
            for decoded in [STANDARD.decode(word), URL_SAFE_NO_PAD.decode(word)]
                .into_iter()
                .flatten()
            {
                let decoded = String::from_utf8_lossy(&decoded);
                assert!(!decoded.contains("Planted"), "{form}: {scrubbed}");
            }
        }
    }
    // Ordinary text is left as it is.
    let plain = "the planted value was replaced; see /42 for details";
    assert_eq!(scrub(plain, [secret]), plain);
}

#[tokio::test]
async fn the_store_keeps_sealed_values_leases_them_by_grant_and_keeps_on_mask() -> anyhow::Result<()>
{
    let nats = dispatch_testkit::NatsServer::start().await?;
    let bus = nats.bus().await?;
    let dir = tempfile::tempdir()?;
    let path = key_path(dir.path());
    let store = Store::open(&bus, path.clone(), Some(Key::load_or_create(&path)?)).await?;

    // Keeping a value that was never stored is refused.
    assert!(store.set("token", MASK).await.is_err());
    assert_eq!(store.set("token", "sk-first-value").await?, Set::Stored);
    assert_eq!(store.set("token", MASK).await?, Set::Kept);
    assert!(matches!(
        store.set("token", "\u{7}").await,
        Err(Error::BadValue { .. })
    ));

    // The bucket holds ciphertext only.
    let raw = bus
        .jetstream()
        .get_key_value(streams::SECRETS_BUCKET)
        .await?
        .get("token")
        .await?
        .unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("sk-first-value"));

    let listed = store.list().await?;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].value), ("token", MASK));
    assert!(listed[0].updated_unix_ms > 0);

    let mut grants = Grants::default();
    grants.grant("http", "token");
    let scope = |connector: &str| Scope {
        connector: connector.into(),
        run_id: "r".into(),
        call_id: "c".into(),
    };
    let until = Instant::now() + Duration::from_secs(60);
    let lease = store
        .lease(&grants, scope("http"), &["token"], until)
        .await?;
    assert_eq!(lease.value("token")?, "sk-first-value");
    assert_eq!(lease.scrub("echo sk-first-value"), "echo ********");
    assert!(!format!("{lease:?}").contains("sk-first"));
    assert!(lease.value("other").is_err());
    // Another connector, a name not granted, a name not stored.
    assert!(matches!(
        store.lease(&grants, scope("fs"), &["token"], until).await,
        Err(Error::NotGranted { .. })
    ));
    grants.grant("http", "missing");
    assert!(matches!(
        store
            .lease(&grants, scope("http"), &["missing"], until)
            .await,
        Err(Error::NotFound(_))
    ));
    // A lease past its deadline hands nothing out.
    let spent = store
        .lease(&grants, scope("http"), &["token"], Instant::now())
        .await?;
    assert!(spent.value("token").is_err());

    // Without the key, stored values cannot be read, and nothing else is told.
    let keyless = Store::open(&bus, dir.path().join("elsewhere.key"), None).await?;
    let err = keyless
        .lease(&grants, scope("http"), &["token"], until)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no secrets key") && !err.contains("sk-first"),
        "{err}"
    );

    assert!(store.remove("token").await?);
    assert!(!store.remove("token").await?);
    assert!(store.list().await?.is_empty());
    Ok(())
}

#[test]
fn text_scrubbed_in_pieces_is_the_whole_text_scrubbed() {
    use base64::Engine as _;
    let secret = "sk-stream-Secret-99";
    let known = Known::of([secret.to_owned()]);
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("x:{secret}"));
    let whole = format!(
        "The key is {secret}, or {} in hex, or {encoded} in base64; done. Ends with {}",
        hex::encode(secret),
        &secret[..9]
    );
    for size in [1, 2, 3, 5, 7, 16, 64, 1000] {
        let mut streaming = Streaming::default();
        let mut passed = String::new();
        let chars: Vec<char> = whole.chars().collect();
        for piece in chars.chunks(size) {
            let piece: String = piece.iter().collect();
            let out = streaming.push(&piece, &known);
            assert!(!out.contains("stream-Secret"), "{size}: {out}");
            passed.push_str(&out);
        }
        passed.push_str(&streaming.finish(&known));
        assert_eq!(passed, known.scrub(&whole), "pieces of {size}");
        assert!(!passed.contains("stream-Secret"), "{passed}");
    }
}
