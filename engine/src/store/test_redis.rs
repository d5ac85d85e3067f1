//! A throw-away `redis-server` for tests (feature `test-util`): a free loopback port, its own temp dir,
//! killed on drop. With [`RedisServer::start_durable`] it runs `appendonly yes` + `appendfsync always`
//! and can be restarted on the same directory (`SHUTDOWN` then start), keeping its data. [`RedisCluster`]:
//! a local 6-node Redis Cluster (`loadtest/redis-cluster.sh`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` owned by a test.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    durable: bool,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn unique_dir() -> std::io::Result<PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "voicegate-redis-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

impl RedisServer {
    /// Starts a memory-only server (`--save '' --appendonly no`).
    pub fn start() -> std::io::Result<Self> {
        Self::launch(unique_dir()?, false, None)
    }

    /// Starts a server persisting every write (`appendonly yes`, `appendfsync always`).
    pub fn start_durable() -> std::io::Result<Self> {
        Self::launch(unique_dir()?, true, None)
    }

    fn launch(dir: PathBuf, durable: bool, port: Option<u16>) -> std::io::Result<Self> {
        let mut server = Self {
            child: None,
            port: 0,
            dir,
            durable,
        };
        server.spawn(port)?;
        Ok(server)
    }

    /// Spawns the process (on `port`, or a free one) and waits until it answers `PING`.
    fn spawn(&mut self, port: Option<u16>) -> std::io::Result<()> {
        let binary = std::env::var("VOICEGATE_REDIS_SERVER")
            .unwrap_or_else(|_| "/usr/bin/redis-server".into());
        let mut last_err = None;
        for _ in 0..5 {
            self.port = match port {
                Some(p) => p,
                None => free_port()?,
            };
            let mut cmd = Command::new(&binary);
            cmd.arg("--port")
                .arg(self.port.to_string())
                .arg("--bind")
                .arg("127.0.0.1")
                .arg("--dir")
                .arg(&self.dir);
            cmd.args([
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ]);
            if self.durable {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
            } else {
                cmd.args(["--appendonly", "no"]);
            }
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            self.child = Some(cmd.spawn()?);
            match self.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.kill();
                    last_err = Some(e);
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| std::io::Error::other("redis-server did not start")))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sends one command (inline protocol) and returns the raw reply text.
    pub fn command(&self, args: &[&str]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{}\r\n", a.len(), a));
        }
        stream.write_all(req.as_bytes())?;
        let mut buf = vec![0u8; 1 << 20];
        let mut out = Vec::new();
        // Replies used by tests are small; read until the reply looks complete.
        loop {
            let n = stream.read(&mut buf)?;
            out.extend_from_slice(&buf[..n]);
            if n == 0 || reply_complete(&out) {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// `calls` of one command in `INFO commandstats` (e.g. `evalsha`), 0 when never called.
    pub fn command_calls(&self, command: &str) -> std::io::Result<u64> {
        Ok(commandstats_calls(
            &self.command(&["INFO", "commandstats"])?,
            command,
        ))
    }

    /// `SHUTDOWN` (the AOF already holds every write), then a new server on the same port and directory.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop()?;
        self.resume()
    }

    /// `SHUTDOWN` and wait for the process to exit (start it again with [`resume`](Self::resume)).
    pub fn stop(&mut self) -> std::io::Result<()> {
        let _ = self.command(&["SHUTDOWN"]);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }

    /// Starts the server again on the same port and directory after [`stop`](Self::stop).
    pub fn resume(&mut self) -> std::io::Result<()> {
        let port = self.port;
        self.spawn(Some(port))
    }

    fn wait_ready(&mut self, limit: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                return Err(std::io::Error::other(format!(
                    "redis-server exited: {status}"
                )));
            }
            if let Ok(reply) = self.command(&["PING"])
                && reply.starts_with("+PONG")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other("redis-server not ready in time"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A local Redis Cluster owned by a test: 6 nodes (3 masters, 3 replicas) on free loopback ports, started and
/// stopped by `loadtest/redis-cluster.sh` (stopped on drop).
pub struct RedisCluster {
    dir: PathBuf,
    ports: Vec<u16>,
}

fn cluster_script() -> String {
    format!(
        "{}/../loadtest/redis-cluster.sh",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// A free loopback port whose cluster-bus port (+10000) is free too.
fn free_cluster_port(taken: &[u16]) -> std::io::Result<u16> {
    loop {
        let port = free_port()?;
        if port > 55_000 || taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
}

impl RedisCluster {
    /// Starts the nodes, joins them and waits until every node says `cluster_state:ok`. Tries three times
    /// (a port found free may be taken by another test before the node binds it).
    pub fn start() -> std::io::Result<Self> {
        let mut last = None;
        for _ in 0..3 {
            match Self::try_start() {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("redis cluster did not start")))
    }

    fn try_start() -> std::io::Result<Self> {
        let dir = unique_dir()?;
        let mut ports = Vec::new();
        for _ in 0..6 {
            let p = free_cluster_port(&ports)?;
            ports.push(p);
        }
        // Dropped (nodes stopped, folder removed) if the start fails.
        let cluster = RedisCluster { dir, ports };
        let out = Command::new("bash")
            .arg(cluster_script())
            .arg("start")
            .arg(&cluster.dir)
            .args(cluster.ports.iter().map(u16::to_string))
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "redis-cluster.sh start: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(cluster)
    }

    /// `redis://127.0.0.1:<port>/` of every node (any of them is a seed).
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    /// `redis-cli` on the first node; its standard output.
    pub fn cli(&self, args: &[&str]) -> std::io::Result<String> {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(self.ports[0].to_string())
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The port of the master serving `key`'s slot (from `CLUSTER KEYSLOT` and `CLUSTER NODES`).
    pub fn master_for(&self, key: &str) -> std::io::Result<u16> {
        let slot: u16 = self
            .cli(&["cluster", "keyslot", key])?
            .trim()
            .parse()
            .map_err(|e| std::io::Error::other(format!("keyslot {key}: {e}")))?;
        for line in self.cli(&["cluster", "nodes"])?.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let Some(port) = fields[1]
                .split(['@', ':'])
                .nth(1)
                .and_then(|p| p.parse::<u16>().ok())
            else {
                continue;
            };
            for range in &fields[8..] {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>())
                    && (lo..=hi).contains(&slot)
                {
                    return Ok(port);
                }
            }
        }
        Err(std::io::Error::other(format!(
            "no master serves slot {slot}"
        )))
    }
}

impl RedisCluster {
    /// `redis-cli` on node `port`; its standard output.
    fn cli_on(&self, port: u16, args: &[&str]) -> std::io::Result<String> {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(port.to_string())
            .args(args)
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `(port, is master)` of every node that answers, from its own `ROLE` (another node's `CLUSTER
    /// NODES` may lag a failover).
    fn roles(&self) -> std::io::Result<Vec<(u16, bool)>> {
        let mut roles = Vec::new();
        for &port in &self.ports {
            let role = self.cli_on(port, &["role"])?;
            if role.starts_with("master") {
                roles.push((port, true));
            } else if role.starts_with("slave") {
                roles.push((port, false));
            }
        }
        Ok(roles)
    }

    /// `INFO commandstats` calls of `command` (lower case) on node `port` (0 when never called).
    pub fn calls_on(&self, port: u16, command: &str) -> std::io::Result<u64> {
        Ok(commandstats_calls(
            &self.cli_on(port, &["info", "commandstats"])?,
            command,
        ))
    }

    /// The port of a replica of the master on `master_port` (from that master's `INFO replication`).
    pub fn replica_of(&self, master_port: u16) -> std::io::Result<u16> {
        let info = self.cli_on(master_port, &["info", "replication"])?;
        info.lines()
            .filter(|l| l.starts_with("slave"))
            .find_map(|l| {
                l.split(',')
                    .find_map(|f| f.strip_prefix("port="))
                    .and_then(|p| p.trim().parse().ok())
            })
            .ok_or_else(|| std::io::Error::other(format!("no replica of {master_port}: {info}")))
    }

    /// Stops node `port` (`SHUTDOWN NOSAVE`), waiting until it no longer answers.
    pub fn shutdown_node(&self, port: u16) -> std::io::Result<()> {
        self.cli_on(port, &["shutdown", "nosave"])?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_ok() {
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!("node {port} still answers")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Empties every master (`FLUSHALL`), waiting until the replicas are empty too.
    pub fn flush_all(&self) -> std::io::Result<()> {
        for (port, master) in self.roles()? {
            if master {
                self.cli_on(port, &["flushall"])?;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for &port in &self.ports {
            loop {
                let size = self.cli_on(port, &["dbsize"])?;
                if size.trim() == "0" {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(std::io::Error::other(format!("node {port} not empty")));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// A graceful manual failover (`CLUSTER FAILOVER` on a replica): the replica catches up with its
    /// master, then takes its slots over (nothing acknowledged is lost; clients get MOVED). Returns once
    /// the replica says it is a master. `which` picks the replica (modulo their number).
    pub fn failover(&self, which: usize) -> std::io::Result<u16> {
        let replicas: Vec<u16> = self
            .roles()?
            .into_iter()
            .filter(|(_, master)| !master)
            .map(|(p, _)| p)
            .collect();
        let Some(&port) = replicas.get(which % replicas.len().max(1)) else {
            return Err(std::io::Error::other("no replica"));
        };
        // A manual failover the master does not complete in time is abandoned by the replica (after
        // cluster-node-timeout × 2, 4 s here): ask again, three times at most.
        for _ in 0..3 {
            let reply = self.cli_on(port, &["cluster", "failover"])?;
            if !reply.trim().eq_ignore_ascii_case("ok") {
                return Err(std::io::Error::other(format!(
                    "CLUSTER FAILOVER on {port}: {reply}"
                )));
            }
            let deadline = Instant::now() + Duration::from_secs(6);
            while Instant::now() < deadline {
                if self.cli_on(port, &["role"])?.starts_with("master") {
                    return Ok(port);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(std::io::Error::other(format!(
            "replica {port} not promoted in time"
        )))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(cluster_script())
            .arg("stop")
            .arg(&self.dir)
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `calls` of `command` (lower case) in an `INFO commandstats` reply (0 when never called).
fn commandstats_calls(info: &str, command: &str) -> u64 {
    let needle = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// True when `out` holds one complete RESP reply of the simple kinds tests use.
fn reply_complete(out: &[u8]) -> bool {
    let Some(&first) = out.first() else {
        return false;
    };
    let text = String::from_utf8_lossy(out);
    match first {
        b'+' | b'-' | b':' => text.ends_with("\r\n"),
        b'$' => {
            let Some(end) = text.find("\r\n") else {
                return false;
            };
            let Ok(len) = text[1..end].parse::<i64>() else {
                return true;
            };
            len < 0 || out.len() >= end + 2 + len as usize + 2
        }
        _ => text.ends_with("\r\n"),
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
