//! The `rstudio-pool` binary: loads the configuration and wires one Pingora `Server` with the
//! command API, the pool manager's reconcile loop and the edge proxy. `demo-workspace` runs the
//! built-in demo workload instead.

use std::collections::HashMap;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::ShutdownWatch;
use pingora_core::server::{ExecutionPhase, RunArgs, Server};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;
use pingora_core::services::ServiceReadyNotifier;

use rstudio_pool::api::{ApiServer, CommandApi};
use rstudio_pool::config::{AuthConfig, Config, ProviderConfig};
use rstudio_pool::core::token::Signer;
use rstudio_pool::demo::{self, DemoOptions};
use rstudio_pool::edge::proxy::EdgeProxy;
use rstudio_pool::edge::redirect::RedirectToHttps;
use rstudio_pool::edge::Edge;
use rstudio_pool::manager::background::Reconciler;
use rstudio_pool::manager::links::UserLinks;
use rstudio_pool::manager::{lock_state, PoolManager};
use rstudio_pool::provider::ec2::Ec2Provider;
use rstudio_pool::provider::metered::Metered;
use rstudio_pool::provider::process::{CommandTemplate, ProcessProvider};
use rstudio_pool::provider::Provider;
use rstudio_pool::tls::{CertStore, CertWatch};

#[derive(Debug, Parser)]
#[command(
    name = "rstudio-pool",
    version,
    about = "A pool of on-demand workspaces behind one edge proxy"
)]
struct Cli {
    /// The configuration file; without it, the embedded default (conf/local.yaml) runs.
    #[arg(short = 'c', long = "conf")]
    conf: Option<String>,
    /// Check the configuration and exit.
    #[arg(short = 't', long = "test")]
    test: bool,
    /// Run in the background (Pingora's daemon mode).
    #[arg(short = 'd', long = "daemon")]
    daemon: bool,
    /// Take over the listening sockets of a running instance (Pingora's graceful upgrade).
    #[arg(short = 'u', long = "upgrade")]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Sub>,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// Run the built-in demo workspace (the embedded default's workload).
    DemoWorkspace(DemoOptions),
    /// Print an example workspace file: `shiny` (the app the shiny purpose runs in a working
    /// folder without an app of its own).
    Example { name: String },
    /// Terminate every workspace of this pool (the one `-c` configures) and clear its
    /// records; the pool must not be running. Users lose their workspaces.
    Down {
        /// Needed for the EC2 provider: it terminates real instances, paused ones too.
        #[arg(long)]
        yes: bool,
    },
    /// Replay a trace of sessions through this configuration's pool under virtual time, once
    /// per `--policy`, and print each policy's waits, instance-hours and cost.
    Simulate(rstudio_pool::sim::cli::SimulateArgs),
    /// Make a trace: a synthetic one, or one from the pool's audit log.
    #[command(subcommand)]
    Trace(rstudio_pool::sim::cli::TraceArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Some(Sub::DemoWorkspace(options)) = cli.command {
        rstudio_pool::audit::init(Default::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| fail(&format!("cannot start the demo workspace: {e}")));
        if let Err(e) = runtime.block_on(demo::run(options)) {
            fail(&format!("demo workspace: {e}"));
        }
        return;
    }

    if let Some(Sub::Example { name }) = &cli.command {
        match name.as_str() {
            "shiny" => print!("{}", include_str!("../rstudio/shiny/app.R")),
            other => fail(&format!(
                "no example `{other}`: the one there is is `shiny`"
            )),
        }
        return;
    }
    if let Some(Sub::Trace(args)) = &cli.command {
        let (out, bad) = rstudio_pool::sim::cli::trace_command(args)
            .unwrap_or_else(|e| fail(&format!("trace: {e}")));
        print!("{out}");
        report_bad_lines(&bad);
        return;
    }
    let env = |name: &str| std::env::var(name).ok();
    let (config, text) = Config::load(cli.conf.as_deref(), &env)
        .unwrap_or_else(|e| fail(&format!("configuration error: {e}")));
    rstudio_pool::audit::init(config.log_format);
    for note in &config.notes {
        log::info!("{note}");
    }
    let server_conf = ServerConf::from_yaml(&text).unwrap_or_else(|e| {
        fail(&format!(
            "configuration error in Pingora's server keys: {e}"
        ))
    });
    if cli.test {
        println!(
            "configuration {} is valid: purposes {:?}, command API on {}, proxy on {}",
            cli.conf.as_deref().unwrap_or("(embedded default)"),
            config.purposes.keys().collect::<Vec<_>>(),
            config.api.listen,
            config.proxy.listen
        );
        return;
    }

    if let Some(Sub::Simulate(args)) = &cli.command {
        // The pool's own log lines (launches, pauses) would drown the table.
        log::set_max_level(log::LevelFilter::Warn);
        let (out, bad) = rstudio_pool::sim::cli::simulate(&config, args)
            .unwrap_or_else(|e| fail(&format!("simulate: {e}")));
        report_bad_lines(&bad);
        print!("{out}");
        return;
    }
    let provider = provider(&config);
    if let Some(Sub::Down { yes }) = cli.command {
        down(&config, provider, yes, cli.conf.as_deref());
        return;
    }
    let provider: Arc<dyn Provider> = Arc::new(Metered(provider));
    rstudio_pool::metrics::metrics().init_purposes(config.purposes.keys().map(String::as_str));
    serve(cli, config, server_conf, provider);
}

/// The configured provider.
fn provider(config: &Config) -> Arc<dyn Provider> {
    match &config.provider {
        ProviderConfig::Process => {
            let state_dir = &config.state_dir;
            let commands: HashMap<String, CommandTemplate> = config
                .purposes
                .iter()
                .map(|(name, p)| (name.clone(), CommandTemplate(p.command.clone())))
                .collect();
            Arc::new(
                ProcessProvider::new(state_dir, &config.pool_name, commands).unwrap_or_else(|e| {
                    fail(&format!(
                        "cannot use STATE_DIR {}: {e}",
                        state_dir.display()
                    ))
                }),
            )
        }
        ProviderConfig::Ec2(ec2) => Arc::new(Ec2Provider::new(
            (**ec2).clone(),
            &config.pool_name,
            &config.purposes,
        )),
    }
}

fn serve(cli: Cli, config: Config, server_conf: ServerConf, provider: Arc<dyn Provider>) {
    let signer = match &config.auth {
        AuthConfig::Token {
            secrets, generated, ..
        } => {
            if *generated {
                log::warn!("no auth.secrets (AUTH_SECRETS) configured: signing workspace links with a random secret, so users' sessions end when rstudio-pool restarts");
            }
            Some(Arc::new(Signer::new(secrets.clone())))
        }
        AuthConfig::None => {
            log::warn!("auth.mode is `none`: anyone who can reach {} opens any workspace whose URL they know; use it on a laptop only", config.proxy.listen);
            None
        }
        AuthConfig::Header { .. } => None,
    };
    let links = UserLinks::new(&config.proxy, &config.auth, signer.clone());
    let manager = PoolManager::new(
        provider,
        config.purposes.clone(),
        links,
        config.ready_timeout,
        config.breaker,
    );

    let opt = Opt {
        upgrade: cli.upgrade,
        daemon: cli.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    // With -u this waits until the running version hands its listening sockets over.
    server.bootstrap();
    // One manager per pool: the old version gives the lock up when it hands over (below);
    // a second rstudio-pool started by mistake on the same state folder is refused.
    let wait = if cli.upgrade { 30 } else { 2 };
    let lock = lock_state(
        &config.state_dir,
        &config.pool_name,
        std::time::Duration::from_secs(wait),
    )
    .unwrap_or_else(|e| fail(&format!("cannot start: {e}")));
    manager.hold_state_lock(lock);
    // Read once this process is the pool's only manager: a predecessor saved them last.
    manager.keep_books(&config.state_dir, &config.pool_name);
    server.add_service(background_service(
        "hand-over on upgrade",
        HandOver {
            manager: Arc::clone(&manager),
            phases: std::sync::Mutex::new(Some(server.watch_execution_phase())),
        },
    ));

    let mut api = Service::new(
        "command API".to_owned(),
        ApiServer::new(
            CommandApi::new(
                Arc::clone(&manager),
                config.api.token.clone(),
                config.api.max_body_bytes,
            )
            .with_currency(&config.currency),
        ),
    );
    api.threads = Some(config.api.threads);
    // No read buffer in front of each connection: the API reads into its own (as the edge).
    api.add_listener(
        ListenerConfig::tcp(config.api.listen.to_string())
            .l4_buffer(L4BufferSettings::default().read(0)),
    );
    server.add_service(api);

    let reconciler = server.add_service(background_service(
        "pool manager",
        FirstRoundFirst(Reconciler {
            manager: Arc::clone(&manager),
            interval: config.reconcile_interval,
        }),
    ));

    let edge = EdgeProxy::new(
        Arc::clone(&manager),
        config.proxy.clone(),
        &config.auth,
        signer,
        Some(&config.state_dir),
    );
    let http = pingora_proxy::http_proxy(&server.configuration, edge.clone());
    let mut proxy = Service::new("edge proxy".to_owned(), Edge::new(edge, http));
    // No 64 KiB read buffer in front of each connection: Pingora's HTTP session reads into
    // its own buffer anyway, so the L4 one only added a copy of every request, and a
    // WebSocket held it for hours.
    let mut listener = ListenerConfig::tcp(config.proxy.listen.to_string())
        .l4_buffer(L4BufferSettings::default().read(0));
    if let Some(files) = &config.proxy.tls {
        let store = CertStore::load(&files.cert, &files.key)
            .unwrap_or_else(|e| fail(&format!("invalid configuration: proxy.tls: {e}")));
        // Intermediate settings (TLS 1.2 and 1.3), the certificate from the store, which
        // loads it again when its files change; HTTP/2 offered by ALPN, HTTP/1.1 kept.
        let mut settings = TlsSettings::intermediate("", "")
            .unwrap_or_else(|e| fail(&format!("cannot set up TLS: {e}")));
        settings.set_cert_resolver(store.clone());
        settings.enable_h2();
        listener = listener.tls(settings);
        server.add_service(background_service("certificate watch", CertWatch(store)));
    }
    proxy.add_listener(listener);
    let proxy = server.add_service(proxy);
    if cli.upgrade {
        // Taking over from a running rstudio-pool, which goes on accepting for 5 s (and the
        // kernel queues connections after that): the edge starts once this process knows
        // the pool, so that no request meets a pool that does not know its instances yet.
        proxy.add_dependency(&reconciler);
    }
    if let Some(addr) = config.proxy.redirect_http {
        let mut redirect = Service::new(
            "redirect to HTTPS".to_owned(),
            RedirectToHttps::new(&config.proxy.public_url),
        );
        redirect.threads = Some(1);
        redirect.add_tcp(&addr.to_string());
        server.add_service(redirect);
    }

    let json = config.log_format == rstudio_pool::audit::LogFormat::Json;
    // Under `log.format: json` everything the process writes is a JSON line: one log record.
    let say = |text: String| {
        if json {
            log::info!("{}", text.replace('\n', " "));
        } else {
            eprintln!("{text}");
        }
    };
    say(format!(
        "rstudio-pool: command API on http://{api} (admin page /admin, metrics /metrics), proxy on {public} ({provider} provider)\n\
         Ask for a workspace:\n  curl -s -X POST http://{api}/ -d '{{\"command\":\"REQUEST_RSTUDIO\",\"payload\":{{\"userId\":\"me\"}}}}'\n\
         then open the `url` it answers in a browser: a link for that user, good once, that leads\n\
         to {public}/i-<instanceId>/.",
        api = config.api.listen,
        public = config.proxy.public_url,
        provider = manager.provider_kind(),
    ));
    server.run(RunArgs::default());
    // Stopped (Ctrl-C, SIGTERM): say what keeps running and how to stop it.
    let left: usize = manager
        .census()
        .values()
        .map(|c| c.assigned + c.free_ready + c.free_launching + c.paused + c.resuming)
        .sum();
    if left > 0 {
        let conf = cli
            .conf
            .as_deref()
            .map(|c| format!(" -c {c}"))
            .unwrap_or_default();
        let what = match &config.provider {
            ProviderConfig::Process => format!(
                "{left} workspace(s) keep running in the background (state in {})",
                config.state_dir.display()
            ),
            ProviderConfig::Ec2(_) => format!("{left} EC2 instance(s) of this pool keep running"),
        };
        say(format!(
            "rstudio-pool stopped. {what}: start rstudio-pool again to take them back, \
             or stop them all with:\n  rstudio-pool{conf} down{yes}   (scripts/run.sh{conf} down{yes})",
            yes = if matches!(config.provider, ProviderConfig::Ec2(_)) { " --yes" } else { "" },
        ));
    }
    std::process::exit(0);
}

/// The reconcile loop, ready for the services that wait on it once the pool has been rebuilt
/// from the provider and the instances found there probed (its first complete round), or
/// after [`FIRST_ROUND_WAIT`] whatever happened.
struct FirstRoundFirst(Reconciler);

const FIRST_ROUND_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[async_trait::async_trait]
impl BackgroundService for FirstRoundFirst {
    async fn start_with_ready_notifier(
        &self,
        shutdown: ShutdownWatch,
        ready_notifier: ServiceReadyNotifier,
    ) {
        let (done, first_round) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(FIRST_ROUND_WAIT, first_round).await;
            ready_notifier.notify_ready();
        });
        let manager = &self.0.manager;
        manager.reconcile().await;
        while !manager.is_recovered() && !*shutdown.borrow() {
            tokio::time::sleep(self.0.interval).await;
            manager.reconcile().await;
        }
        let _ = done.send(());
        self.0.start(shutdown).await;
    }
}

/// Hands the pool over when a graceful upgrade begins (`SIGQUIT`, a new version started with
/// `-u` waiting for the listening sockets): from then on only the new process assigns.
struct HandOver {
    manager: Arc<PoolManager>,
    phases: std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<ExecutionPhase>>>,
}

#[async_trait::async_trait]
impl BackgroundService for HandOver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut phases) = self.phases.lock().ok().and_then(|mut p| p.take()) else {
            return;
        };
        loop {
            tokio::select! {
                phase = phases.recv() => match phase {
                    Ok(ExecutionPhase::GracefulUpgradeTransferringFds) => {
                        self.manager.hand_over();
                        return;
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// `rstudio-pool down`: terminates every instance of the pool and clears its records.
fn down(config: &Config, provider: Arc<dyn Provider>, yes: bool, conf: Option<&str>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("cannot start: {e}")));
    runtime.block_on(async {
        // A running pool would launch its warm instances again at once.
        let health = format!("{}", config.api.listen);
        if tokio::time::timeout(
            std::time::Duration::from_secs(1),
            tokio::net::TcpStream::connect(&health),
        )
        .await
        .is_ok_and(|c| c.is_ok())
        {
            fail(&format!(
                "something answers on the command API's address {health}: stop the running rstudio-pool first (Ctrl-C), then run down again"
            ));
        }
        let instances = provider
            .list()
            .await
            .unwrap_or_else(|e| fail(&format!("cannot list the pool's instances: {e}")));
        if instances.is_empty() {
            println!("no workspaces of pool `{}` are left", config.pool_name);
        }
        if matches!(config.provider, ProviderConfig::Ec2(_)) && !yes && !instances.is_empty() {
            let conf = conf.map(|c| format!(" -c {c}")).unwrap_or_default();
            fail(&format!(
                "this terminates {} EC2 instance(s) of pool `{}`, paused users' work included; run `rstudio-pool{conf} down --yes` to go ahead",
                instances.len(),
                config.pool_name
            ));
        }
        let mut failed = 0;
        for record in &instances {
            match provider.terminate(&record.id).await {
                Ok(()) => println!(
                    "terminated {} ({}, {})",
                    record.id,
                    record.purpose().unwrap_or("no purpose"),
                    record
                        .tags
                        .get(rstudio_pool::provider::TAG_USER)
                        .map_or("free", String::as_str)
                ),
                Err(e) => {
                    failed += 1;
                    eprintln!("cannot terminate {}: {e}", record.id);
                }
            }
        }
        if let ProviderConfig::Process = config.provider {
            // Nothing of the pool is left to remember: the next start begins empty.
            let _ = std::fs::remove_file(config.state_dir.join("tags.log"));
        }
        if failed > 0 {
            fail(&format!("{failed} instance(s) could not be terminated; run down again"));
        }
    });
}

fn fail(message: &str) -> ! {
    eprintln!("rstudio-pool: {message}");
    std::process::exit(2);
}

/// Says which lines of an input were skipped, and why (everything else was used).
fn report_bad_lines(bad: &[String]) {
    for line in bad {
        eprintln!("skipped {line}");
    }
    if !bad.is_empty() {
        eprintln!("{} line(s) skipped; every other line was used", bad.len());
    }
}
