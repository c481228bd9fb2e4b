//! The Bearer token flow against the real `docker-registry` configured with `auth.token`:
//! a token server written here (ES256 JWTs signed with a key whose self-signed certificate
//! is the registry's `rootcertbundle`, sent in the JWT's `x5c` header).

mod common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use common::{bytes, make_image_dir, serve, Req, Resp};
use lode_registry::testing::{TestAuth, TestRegistry};
use lode_registry::{pull_image, push_image, ClientOptions, Error, RegistryClient};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

const SERVICE: &str = "lode-test-registry";
const ISSUER: &str = "lode-test-issuer";

struct Signer {
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    cert_pem: String,
}

fn signer() -> Signer {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["lode-token-signer".to_string()])
        .unwrap()
        .self_signed(&kp)
        .unwrap();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &kp.serialize_der(),
        &SystemRandom::new(),
    )
    .unwrap();
    Signer {
        key,
        cert_der: cert.der().to_vec(),
        cert_pem: cert.pem(),
    }
}

fn jwt(s: &Signer, subject: &str, scopes: &[String]) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|sc| {
            let mut p = sc.splitn(3, ':');
            let (typ, name, actions) = (p.next()?, p.next()?, p.next()?);
            Some(serde_json::json!({"type": typ, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let header =
        serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&s.cert_der)]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": subject, "aud": SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now,
        "jti": format!("{now}-{}", scopes.join(" ")), "access": access
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = s
        .key
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .unwrap();
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

#[test]
fn bearer_token_flow_against_docker_registry() {
    let s = Arc::new(signer());
    let seen: Arc<Mutex<Vec<Req>>> = Arc::default();
    let (token_addr, token_count) = {
        let (s, seen) = (s.clone(), seen.clone());
        serve(move |req: &Req| {
            seen.lock().unwrap().push(req.clone());
            let basic = format!("Basic {}", STANDARD.encode("bob:hunter2"));
            if req.path() != "/token" || req.header("Authorization") != Some(basic.as_str()) {
                return Resp::new(
                    401,
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"who are you"}]}"#,
                );
            }
            let token = jwt(&s, "bob", &req.query("scope"));
            Resp::new(
                200,
                serde_json::json!({"token": token, "expires_in": 300}).to_string(),
            )
            .header("Content-Type", "application/json")
        })
    };
    let reg = TestRegistry::start_with(TestAuth::Token {
        realm: format!("http://{token_addr}/token"),
        service: SERVICE.into(),
        issuer: ISSUER.into(),
        root_cert_pem: s.cert_pem.clone(),
    });
    let opts = ClientOptions {
        credentials: Some(("bob".into(), "hunter2".into())),
        ..reg.client_options()
    };
    let client = RegistryClient::new(opts.clone()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let image_json = make_image_dir(&src, &bytes(31, 2000), &[bytes(32, 40_000), bytes(33, 5)]);
    let r = reg.reference("lode/tok:v1");

    push_image(&client, &src, &r).unwrap_or_else(|e| panic!("{e}\nregistry log:\n{}", reg.log()));
    // One token for pull,push on the repository, reused for every blob and the manifest.
    assert_eq!(token_count.load(Ordering::SeqCst), 1);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].query("service"), vec![SERVICE]);
        assert_eq!(
            seen[0].query("scope"),
            vec!["repository:lode/tok:pull,push"]
        );
    }
    let dst = tmp.path().join("dst");
    pull_image(&client, &r, &dst, true).unwrap();
    pull_image(&client, &r, &dst, true).unwrap();
    assert_eq!(std::fs::read(dst.join("image.json")).unwrap(), image_json);
    // The pull,push token serves pulls too.
    assert_eq!(token_count.load(Ordering::SeqCst), 1);
    // A fresh client asks for pull only, once.
    let reader = RegistryClient::new(opts.clone()).unwrap();
    pull_image(&reader, &r, &tmp.path().join("dst2"), true).unwrap();
    pull_image(&reader, &r, &tmp.path().join("dst3"), false).unwrap();
    assert_eq!(token_count.load(Ordering::SeqCst), 2);
    assert_eq!(
        seen.lock().unwrap()[1].query("scope"),
        vec!["repository:lode/tok:pull"]
    );

    // Wrong password: the token server says no, and the error says so.
    let bad = RegistryClient::new(ClientOptions {
        credentials: Some(("bob".into(), "nope".into())),
        ..opts.clone()
    })
    .unwrap();
    let e = bad.get_manifest(&r, &[]).unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("refused a token") && msg.contains("who are you") && msg.contains("\"bob\""),
        "{msg}"
    );

    // Anonymous: same, with where credentials were looked for.
    let anon = RegistryClient::new(ClientOptions {
        credentials: None,
        ..opts
    })
    .unwrap();
    let msg = anon.get_manifest(&r, &[]).unwrap_err().to_string();
    assert!(
        msg.contains("anonymously") && msg.contains("no credentials given or found"),
        "{msg}"
    );
}
