//! The `rstudio-pool` binary: loads the configuration and wires one Pingora `Server` with the
//! command API, the pool manager's reconcile loop and the edge proxy. `demo-workspace` runs the
//! built-in demo workload instead.

use std::collections::HashMap;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::background::background_service;
use pingora_core::services::listening::Service;

use rstudio_pool::api::{ApiServer, CommandApi};
use rstudio_pool::config::{AuthConfig, Config, ProviderConfig};
use rstudio_pool::core::token::Signer;
use rstudio_pool::demo::{self, DemoOptions};
use rstudio_pool::edge::proxy::EdgeProxy;
use rstudio_pool::edge::Edge;
use rstudio_pool::manager::background::Reconciler;
use rstudio_pool::manager::links::UserLinks;
use rstudio_pool::manager::PoolManager;
use rstudio_pool::provider::ec2::Ec2Provider;
use rstudio_pool::provider::process::{CommandTemplate, ProcessProvider};
use rstudio_pool::provider::Provider;

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
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    if let Some(Sub::DemoWorkspace(options)) = cli.command {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| fail(&format!("cannot start the demo workspace: {e}")));
        if let Err(e) = runtime.block_on(demo::run(options)) {
            fail(&format!("demo workspace: {e}"));
        }
        return;
    }

    let env = |name: &str| std::env::var(name).ok();
    let (config, text) = Config::load(cli.conf.as_deref(), &env)
        .unwrap_or_else(|e| fail(&format!("configuration error: {e}")));
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

    let provider: Arc<dyn Provider> = match &config.provider {
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
    };
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
    server.bootstrap();

    let mut api = Service::new(
        "command API".to_owned(),
        ApiServer::new(CommandApi::new(
            Arc::clone(&manager),
            config.api.token.clone(),
            config.api.max_body_bytes,
        )),
    );
    api.threads = Some(config.api.threads);
    // No read buffer in front of each connection: the API reads into its own (as the edge).
    api.add_listener(
        ListenerConfig::tcp(config.api.listen.to_string())
            .l4_buffer(L4BufferSettings::default().read(0)),
    );
    server.add_service(api);

    server.add_service(background_service(
        "pool manager",
        Reconciler {
            manager: Arc::clone(&manager),
            interval: config.reconcile_interval,
        },
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
    proxy.add_listener(
        ListenerConfig::tcp(config.proxy.listen.to_string())
            .l4_buffer(L4BufferSettings::default().read(0)),
    );
    server.add_service(proxy);

    println!(
        "rstudio-pool: command API on http://{api}, proxy on {public} ({provider} provider)\n\
         Ask for a workspace:\n  curl -s -X POST http://{api}/ -d '{{\"command\":\"REQUEST_RSTUDIO\",\"payload\":{{\"userId\":\"me\"}}}}'\n\
         then open the `url` it answers in a browser: a link for that user, good once, that leads\n\
         to {public}/i-<instanceId>/.",
        api = config.api.listen,
        public = config.proxy.public_url,
        provider = manager.provider_kind(),
    );
    server.run_forever();
}

fn fail(message: &str) -> ! {
    eprintln!("rstudio-pool: {message}");
    std::process::exit(2);
}
