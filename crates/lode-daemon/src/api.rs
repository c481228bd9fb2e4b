//! The daemon's HTTP API on its unix socket (documented in docs/API.md).
//!
//! | method + path | body / query | answer |
//! |---|---|---|
//! | `GET /v1/version` | | version, pid, socket, cache and run dirs, uptime |
//! | `GET /v1/mounts` | | every mount with its mode, image, state and counters |
//! | `POST /v1/mounts` | [`MountRequest`] JSON | [`Mounted`] (201) |
//! | `GET /v1/mounts/status?mountpoint=P` | | one mount |
//! | `DELETE /v1/mounts?mountpoint=P` | | unmounts |
//! | `POST /v1/mounts/prefetch?mountpoint=P` | `{"rate": bytes/s}` | fetch the whole image in the background |
//! | `GET /v1/cache` | | cache summary and blobs |
//! | `POST /v1/cache/gc` | `{"max_size": bytes}` | evicts unused blobs down to max_size |
//! | `POST /v1/upgrade` | | restarts every mount's worker on the binary now on disk |
//! | `GET /metrics` | | Prometheus text format |
//!
//! Errors are `{"error": "…"}` with 400 (bad request), 404 (no such mount), 409 (the mount
//! point is busy with another request) or 500.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::config::Config;
use crate::metrics::CacheSummary;
use crate::mounts::{self, Mounted};
use crate::request::{FuseOptions, Mode, MountRequest, RegistryOptions};

/// What every handler shares.
pub struct Daemon {
    pub config: Config,
    pub started: Instant,
    /// Mount points with a mount/umount in progress.
    busy: Mutex<HashSet<PathBuf>>,
}

impl Daemon {
    pub fn new(config: Config) -> Arc<Daemon> {
        Arc::new(Daemon {
            config,
            started: Instant::now(),
            busy: Mutex::new(HashSet::new()),
        })
    }

    pub fn cache_summary(
        &self,
    ) -> anyhow::Result<(CacheSummary, Vec<lode_storage::cache::CacheEntry>)> {
        let dir = &self.config.cache_dir;
        let entries = lode_storage::cache::list(dir)?;
        let max_size = self
            .config
            .cache_max_size
            .as_deref()
            .map(lode_storage::cache::parse_size)
            .transpose()?;
        Ok((
            CacheSummary {
                dir: dir.clone(),
                blobs: entries.len() as u64,
                disk_bytes: entries.iter().map(|e| e.disk_bytes).sum(),
                apparent_bytes: entries.iter().map(|e| e.size).sum(),
                in_use: entries.iter().filter(|e| e.in_use).count() as u64,
                max_size,
            },
            entries,
        ))
    }
}

/// An error answer.
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/mounts", get(list).post(mount).delete(umount))
        .route("/v1/mounts/status", get(status))
        .route("/v1/mounts/prefetch", post(prefetch))
        .route("/v1/cache", get(cache))
        .route("/v1/cache/gc", post(cache_gc))
        .route("/v1/upgrade", post(upgrade))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .with_state(daemon)
}

/// Blocking work (mounting, reading stats files and sockets) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("worker task: {e}"),
        )
    })?
}

async fn version(State(d): State<Arc<Daemon>>) -> Json<serde_json::Value> {
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "socket": d.config.socket,
        "cache_dir": d.config.cache_dir,
        "run_dir": lode_mount::runtime::run_dir(),
        "uptime_secs": d.started.elapsed().as_secs(),
    }))
}

async fn list() -> ApiResult<Json<Vec<mounts::MountStatus>>> {
    blocking(|| Ok(Json(mounts::list()))).await
}

#[derive(Deserialize)]
struct MountpointQuery {
    mountpoint: PathBuf,
}

async fn status(Query(q): Query<MountpointQuery>) -> ApiResult<Json<mounts::MountStatus>> {
    blocking(move || {
        if lode_mount::runtime::load(&canonical(&q.mountpoint)?).is_none() {
            return Err(not_a_mount(&q.mountpoint));
        }
        Ok(Json(mounts::status(&q.mountpoint)?))
    })
    .await
}

fn canonical(p: &Path) -> ApiResult<PathBuf> {
    if !p.is_absolute() {
        return Err(ApiError::bad(format!(
            "mountpoint {} must be an absolute path",
            p.display()
        )));
    }
    std::fs::canonicalize(p).map_err(|e| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("mount point {}: {e}", p.display()),
        )
    })
}

fn not_a_mount(p: &Path) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("{} is not a lode mount", p.display()),
    )
}

/// Marks a mount point busy for the life of the guard.
struct Busy(Arc<Daemon>, PathBuf);

impl Busy {
    fn claim(d: &Arc<Daemon>, p: &Path) -> ApiResult<Busy> {
        if !d.busy.lock().expect("busy lock").insert(p.to_path_buf()) {
            return Err(ApiError(
                StatusCode::CONFLICT,
                format!(
                    "{} is busy with another mount or umount request",
                    p.display()
                ),
            ));
        }
        Ok(Busy(d.clone(), p.to_path_buf()))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.lock().expect("busy lock").remove(&self.1);
    }
}

async fn mount(
    State(d): State<Arc<Daemon>>,
    body: Result<Json<MountRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<(StatusCode, Json<Mounted>)> {
    let Json(mut req) =
        body.map_err(|e| ApiError::bad(format!("mount request: {}", e.body_text())))?;
    if !req.mountpoint.is_absolute() {
        return Err(ApiError::bad(format!(
            "mountpoint {} must be an absolute path",
            req.mountpoint.display()
        )));
    }
    req.mountpoint = canonical(&req.mountpoint)?;
    // What the request leaves at its defaults, the daemon's configuration decides.
    if req.mode == Mode::Auto {
        req.mode = d.config.default_mode;
    }
    if req.registry == RegistryOptions::default() {
        req.registry = d.config.registry.clone();
    }
    if req.fuse == FuseOptions::default() {
        req.fuse = d.config.fuse.clone();
    }
    req.validate()
        .map_err(|e| ApiError::bad(format!("{e:#}")))?;
    let busy = Busy::claim(&d, &req.mountpoint)?;
    blocking(move || {
        let _busy = busy;
        tracing::info!(image = %req.image, mountpoint = %req.mountpoint.display(), mode = %req.mode, "mount");
        let m = mounts::mount(&req, &d.config.cache_dir).inspect_err(|e| {
            tracing::warn!("mount of {} failed: {e:#}", req.image);
        })?;
        tracing::info!(mode = %m.mode, pid = m.pid, "mounted {}", m.mountpoint.display());
        Ok((StatusCode::CREATED, Json(m)))
    })
    .await
}

async fn umount(
    State(d): State<Arc<Daemon>>,
    Query(q): Query<MountpointQuery>,
) -> ApiResult<Json<serde_json::Value>> {
    let mnt = canonical(&q.mountpoint)?;
    if lode_mount::runtime::load(&mnt).is_none() && !mounts::is_mountpoint(&mnt) {
        return Err(not_a_mount(&mnt));
    }
    let busy = Busy::claim(&d, &mnt)?;
    blocking(move || {
        let _busy = busy;
        let warning = mounts::umount(&mnt)?;
        tracing::info!("unmounted {}", mnt.display());
        Ok(Json(json!({ "unmounted": mnt, "warning": warning })))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefetchBody {
    #[serde(default)]
    rate: u64,
}

async fn prefetch(
    Query(q): Query<MountpointQuery>,
    body: axum::body::Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    // The body is optional: no body means no rate limit.
    let rate = if body.iter().all(u8::is_ascii_whitespace) {
        0
    } else {
        serde_json::from_slice::<PrefetchBody>(&body)
            .map_err(|e| ApiError::bad(format!("prefetch request: {e}")))?
            .rate
    };
    blocking(move || {
        let mnt = canonical(&q.mountpoint)?;
        let rec = lode_mount::runtime::load(&mnt).ok_or_else(|| not_a_mount(&mnt))?;
        if let Some(why) = crate::control::prefetch_unsupported(&rec) {
            return Err(ApiError::bad(why));
        }
        crate::control::prefetch_all(&rec, rate)?;
        Ok(Json(
            json!({ "prefetch": "started", "mountpoint": mnt, "rate": rate }),
        ))
    })
    .await
}

async fn cache(State(d): State<Arc<Daemon>>) -> ApiResult<Json<serde_json::Value>> {
    blocking(move || {
        let (summary, blobs) = d.cache_summary()?;
        Ok(Json(json!({ "summary": summary, "blobs": blobs })))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GcBody {
    max_size: u64,
}

async fn cache_gc(
    State(d): State<Arc<Daemon>>,
    body: Result<Json<GcBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Json(b) = body.map_err(|e| ApiError::bad(format!("gc request: {}", e.body_text())))?;
    blocking(move || {
        let removed = lode_storage::cache::gc(&d.config.cache_dir, b.max_size)?;
        let freed: u64 = removed.iter().map(|e| e.disk_bytes).sum();
        Ok(Json(json!({ "removed": removed, "freed_bytes": freed })))
    })
    .await
}

async fn upgrade() -> ApiResult<Json<serde_json::Value>> {
    blocking(|| Ok(Json(crate::control::upgrade_workers()))).await
}

async fn metrics(State(d): State<Arc<Daemon>>) -> ApiResult<Response> {
    blocking(move || {
        let mounts = mounts::list();
        let (cache, _) = d.cache_summary()?;
        let body = crate::metrics::render(&mounts, &cache, d.started.elapsed().as_secs());
        Ok((
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response())
    })
    .await
}
