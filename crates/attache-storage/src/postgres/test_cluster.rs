//! A throwaway PostgreSQL for tests and load examples, so they need no
//! running server: `initdb` + `pg_ctl` from the installed binaries into a
//! temporary directory, on a free loopback port, stopped and removed on drop.
//! `ATTACHE_TEST_PG_URL` (a server URL whose user may create databases) is
//! used instead when set.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A PostgreSQL server for one test (or one example run).
pub struct TestCluster {
    url: String,
    owned: Option<Owned>,
}

struct Owned {
    dir: PathBuf,
    pg_ctl: PathBuf,
    as_postgres: bool,
}

/// Why no cluster could be had (the caller hands it to [`missing_service`]).
pub type Unavailable = String;

/// The environment variable that makes a missing test service (PostgreSQL,
/// Redis) a failure instead of a skip. CI (`.ci/run`) sets it.
pub const REQUIRE_SERVICES: &str = "ATTACHE_REQUIRE_SERVICES";

/// Called by a test whose service is missing: panics when
/// `ATTACHE_REQUIRE_SERVICES` is set (to anything but `0` or empty), so a CI
/// run cannot pass by skipping; otherwise prints why the test is skipped.
pub fn missing_service(service: &str, why: &str) {
    let required = std::env::var(REQUIRE_SERVICES).is_ok_and(|v| !v.is_empty() && v != "0");
    if required {
        panic!("{service} is required ({REQUIRE_SERVICES} is set) but could not be had: {why}");
    }
    eprintln!("SKIPPED: no {service} to test against: {why} (set {REQUIRE_SERVICES}=1 to make this a failure)");
}

fn find_bin(name: &str) -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    versions.sort_by_key(|p| {
        let version = p.parent().and_then(Path::parent).and_then(|v| v.file_name()).and_then(|v| v.to_str());
        version.and_then(|v| v.parse::<u32>().ok()).unwrap_or(0)
    });
    if let Some(p) = versions.pop() {
        return Some(p);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.exists())
}

fn is_root() -> bool {
    // PostgreSQL refuses to run as root; as root, it runs as `postgres`.
    Command::new("id").arg("-u").output().ok().is_some_and(|o| o.stdout.starts_with(b"0\n"))
}

fn run(as_postgres: bool, program: &Path, args: &[&str]) -> Result<(), Unavailable> {
    let mut cmd = if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = cmd.args(args).output().map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn free_port() -> Result<u16, Unavailable> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

impl TestCluster {
    /// `ATTACHE_TEST_PG_URL`, or a new cluster; `Err` says why neither is possible.
    /// `durable: false` turns fsync off (fine for behaviour tests, not for measurements).
    pub fn start(durable: bool) -> Result<TestCluster, Unavailable> {
        if let Ok(url) = std::env::var("ATTACHE_TEST_PG_URL") {
            return Ok(TestCluster { url, owned: None });
        }
        let initdb = find_bin("initdb").ok_or("no PostgreSQL binaries (initdb) are installed")?;
        let pg_ctl = find_bin("pg_ctl").ok_or("no PostgreSQL binaries (pg_ctl) are installed")?;
        let as_postgres = is_root();
        let dir = std::env::temp_dir().join(format!("attache-pg-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        if as_postgres {
            let status = Command::new("chown").args(["postgres:postgres"]).arg(&dir).status();
            if !status.is_ok_and(|s| s.success()) {
                return Err("cannot hand the cluster directory to the postgres user".into());
            }
        }
        let mut cluster = TestCluster {
            url: String::new(),
            owned: Some(Owned { dir: dir.clone(), pg_ctl: pg_ctl.clone(), as_postgres }),
        };
        let data = dir.join("data");
        let data_s = data.to_string_lossy().into_owned();
        run(as_postgres, &initdb, &["-D", &data_s, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])?;
        let mut last_err = String::new();
        for _ in 0..5 {
            let port = free_port()?;
            let opts = format!(
                "-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={} -c fsync={} \
                 -c max_connections=200 -c shared_buffers=64MB",
                dir.display(),
                if durable { "on" } else { "off" }
            );
            let log = dir.join("log").to_string_lossy().into_owned();
            match run(as_postgres, &pg_ctl, &["-D", &data_s, "-l", &log, "-o", &opts, "-w", "-t", "30", "start"]) {
                Ok(()) => {
                    cluster.url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
                    return Ok(cluster);
                }
                Err(e) => last_err = format!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()),
            }
        }
        Err(last_err)
    }

    /// The server's URL (its `postgres` database).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Creates an empty database and returns its URL.
    pub async fn fresh_database(&self) -> Result<String, Unavailable> {
        use sqlx::Connection;
        let name = format!("attache_test_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::PgConnection::connect(&self.url).await.map_err(|e| e.to_string())?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.map_err(|e| e.to_string())?;
        let _ = conn.close().await;
        let mut url = url::Url::parse(&self.url).map_err(|e| e.to_string())?;
        url.set_path(&name);
        Ok(url.to_string())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(owned) = self.owned.take() {
            let data = owned.dir.join("data").to_string_lossy().into_owned();
            let _ = run(owned.as_postgres, &owned.pg_ctl, &["-D", &data, "-m", "immediate", "-w", "stop"]);
            let _ = std::fs::remove_dir_all(&owned.dir);
        }
    }
}
