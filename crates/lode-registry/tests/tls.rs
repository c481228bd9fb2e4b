//! HTTPS: the rustls client against `docker-registry` serving a self-signed certificate.

mod common;

use common::{bytes, make_image_dir};
use lode_registry::testing::TestRegistry;
use lode_registry::{pull_image, push_image, ClientOptions, Error, RegistryClient};

/// The error and its sources, as `anyhow`'s `{:#}` prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[test]
fn https_with_insecure_tls_and_certificate_errors_without() {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let reg = TestRegistry::start_with_basic_auth_tls(&ck.cert.pem(), &ck.key_pair.serialize_pem());
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let image_json = make_image_dir(&src, &bytes(41, 777), &[bytes(42, 20_000)]);
    let r = reg.reference("lode/tls:v1");

    let client = reg.client();
    assert!(client.options().insecure_tls && !client.options().plain_http);
    push_image(&client, &src, &r).unwrap();
    pull_image(&client, &r, &tmp.path().join("dst"), true).unwrap();
    assert_eq!(
        std::fs::read(tmp.path().join("dst/image.json")).unwrap(),
        image_json
    );

    // Certificates are verified unless told otherwise.
    let strict = RegistryClient::new(ClientOptions {
        insecure_tls: false,
        retries: 0,
        ..reg.client_options()
    })
    .unwrap();
    let e = strict.get_manifest(&r, &[]).unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e:?}");
    let msg = chain(&e);
    assert!(
        msg.contains(&format!("https://{}/v2/lode/tls/manifests/v1", reg.host())),
        "{msg}"
    );
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
}
