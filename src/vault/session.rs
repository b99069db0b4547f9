//! A Vault client ready to read: address, TLS and namespace from the options,
//! a token or a login, retries with backoff, and failed requests sorted into
//! the cases that decide the exit code.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustify::errors::ClientError as RustifyError;
use tracing::instrument::WithSubscriber;
use vaultrs::client::{Client, VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

use super::{AuthMethod, VaultArgs, VaultError};

/// Attempts of one request when Vault cannot be reached or responds with a
/// status that may pass (429, 5xx).
pub(super) const ATTEMPTS: u32 = 4;
/// Wait before the second attempt; it doubles before each later one, so four
/// attempts wait 0.5 + 1 + 2 seconds in all.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(500);
/// Time limit of one HTTP request, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP statuses after which the same request may succeed: a failed
/// precondition on a replica (412), rate limiting (429), server errors, and a
/// sealed or standby server (503).
const TRANSIENT_STATUSES: [u16; 6] = [412, 429, 500, 502, 503, 504];

/// A Vault client with a token, and the details its error messages name.
pub(super) struct Session {
    client: VaultClient,
    /// The server's address, for messages.
    address: String,
    /// Source of the token, for messages, e.g. "the token from VAULT_TOKEN".
    auth: String,
    /// Token, secret ID and JWT, removed from any text Vault sends back.
    secrets: Vec<Zeroizing<String>>,
}

/// Credentials for one auth method. Debug output shows no secret.
enum Credentials {
    Token {
        token: Zeroizing<String>,
        source: String,
    },
    AppRole {
        mount: String,
        role_id: String,
        secret_id: Zeroizing<String>,
    },
    Kubernetes(KubernetesLogin),
}

/// The parameters of a Kubernetes auth login: `POST auth/{mount}/login` with
/// the role and the service account JWT.
pub struct KubernetesLogin {
    pub mount: String,
    pub role: String,
    pub jwt: Zeroizing<String>,
}

impl fmt::Debug for KubernetesLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubernetesLogin")
            .field("mount", &self.mount)
            .field("role", &self.role)
            .field("jwt", &format_args!("<{} characters>", self.jwt.len()))
            .finish()
    }
}

/// Builds the Kubernetes login parameters from the options: the role from
/// --vault-k8s-role and the JWT read from --vault-k8s-jwt-file.
pub fn kubernetes_login(args: &VaultArgs) -> Result<KubernetesLogin, VaultError> {
    let role = given(&args.vault_k8s_role).ok_or_else(|| {
        VaultError::Config(
            "Kubernetes auth needs a Vault role: set --vault-k8s-role or REENCRYPT_VAULT_K8S_ROLE"
                .into(),
        )
    })?;
    let jwt = read_secret_file(
        &args.vault_k8s_jwt_file,
        "service account token file (--vault-k8s-jwt-file)",
    )?;
    Ok(KubernetesLogin {
        mount: mount_name(&args.vault_k8s_mount, "--vault-k8s-mount")?,
        role: role.to_string(),
        jwt,
    })
}

impl Session {
    /// Builds the client from the options alone and logs in when the auth
    /// method needs it.
    pub(super) async fn open(args: &VaultArgs) -> Result<Session, VaultError> {
        let address = address(args.vault_addr.as_deref())?;
        // Messages name the server without the user and password that an
        // address may carry for a proxy in front of Vault.
        let display_address = without_url_credentials(address.as_str().trim_end_matches('/'));
        let namespace = match given(&args.vault_namespace) {
            Some(namespace) => {
                check_header_safe(namespace, "Vault namespace (--vault-namespace)")?;
                Some(namespace.to_string())
            }
            None => None,
        };
        let ca_certs = ca_certificates(args)?;
        let credentials = credentials(args)?;

        if args.vault_skip_verify {
            tracing::warn!(address = %display_address, "Vault's TLS certificate is not verified (VAULT_SKIP_VERIFY or --vault-skip-verify).");
        }
        if std::env::var_os("VAULT_CLIENT_CERT").is_some() {
            tracing::warn!("VAULT_CLIENT_CERT is set, but TLS client certificates are not supported; it is ignored.");
        }

        // Every field that vaultrs would otherwise take from a VAULT_* variable
        // is set here, so that only the options above decide.
        let token = match &credentials {
            Credentials::Token { token, .. } => token.clone(),
            _ => Zeroizing::new(String::new()),
        };
        let settings = VaultClientSettingsBuilder::default()
            .address(address.as_str())
            .token(token.as_str())
            .verify(!args.vault_skip_verify)
            .ca_certs(ca_certs)
            .identity(None)
            .timeout(Some(REQUEST_TIMEOUT))
            .namespace(namespace)
            .build()
            .map_err(|e| VaultError::Config(format!("invalid Vault client settings: {e}")))?;
        // vaultrs would log its own TLS warning; the one above replaces it.
        let client =
            tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), || {
                VaultClient::new(settings)
            })
            .map_err(|e| VaultError::Config(format!("cannot set up the Vault client: {e}")))?;

        let mut session = Session {
            client,
            address: display_address,
            auth: String::new(),
            secrets: vec![token],
        };
        match credentials {
            Credentials::Token { source, .. } => session.auth = format!("the token from {source}"),
            Credentials::AppRole {
                mount,
                role_id,
                secret_id,
            } => session.login_approle(&mount, &role_id, secret_id).await?,
            Credentials::Kubernetes(login) => session.login_kubernetes(login).await?,
        }
        Ok(session)
    }

    /// Logs in with AppRole and keeps the token it returns.
    async fn login_approle(
        &mut self,
        mount: &str,
        role_id: &str,
        secret_id: Zeroizing<String>,
    ) -> Result<(), VaultError> {
        self.secrets.push(secret_id.clone());
        let context = format!("AppRole login at auth/{mount} failed");
        let result = self
            .call("AppRole login", || {
                vaultrs::auth::approle::login(&self.client, mount, role_id, &secret_id)
            })
            .await;
        let auth = result.map_err(|e| {
            self.login_failure(
                e,
                &context,
                "check the role ID, the secret ID and --vault-approle-mount",
            )
        })?;
        self.use_token(Zeroizing::new(auth.client_token));
        self.auth = format!("the token from the AppRole login at auth/{mount}");
        tracing::info!(mount, "Logged in to Vault with AppRole.");
        Ok(())
    }

    /// Logs in with the Kubernetes auth method and keeps the token it returns.
    async fn login_kubernetes(&mut self, login: KubernetesLogin) -> Result<(), VaultError> {
        self.secrets.push(login.jwt.clone());
        let context = format!(
            "Kubernetes login at auth/{} as role {:?} failed",
            login.mount, login.role
        );
        let result = self
            .call("Kubernetes login", || {
                vaultrs::auth::kubernetes::login(
                    &self.client,
                    &login.mount,
                    &login.role,
                    &login.jwt,
                )
            })
            .await;
        let auth = result.map_err(|e| {
            self.login_failure(
                e,
                &context,
                "check that the role binds this pod's service account and namespace, and --vault-k8s-mount",
            )
        })?;
        self.use_token(Zeroizing::new(auth.client_token));
        self.auth = format!(
            "the token from the Kubernetes login at auth/{} as role {:?}",
            login.mount, login.role
        );
        tracing::info!(mount = %login.mount, role = %login.role, "Logged in to Vault with Kubernetes auth.");
        Ok(())
    }

    fn use_token(&mut self, token: Zeroizing<String>) {
        self.client.set_token(&token);
        self.secrets.push(token);
    }

    pub(super) fn client(&self) -> &VaultClient {
        &self.client
    }

    pub(super) fn address(&self) -> &str {
        &self.address
    }

    /// Sends one request, and again with backoff while the failure may pass.
    ///
    /// vaultrs logs every error response at ERROR level, including the 404 of
    /// a deleted version that `previous` expects and skips. Its logs are
    /// silenced here, and this module reports each failure itself.
    pub(super) async fn call<T, F, Fut>(
        &self,
        request_name: &str,
        mut request: F,
    ) -> Result<T, RequestError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut delay = FIRST_RETRY_DELAY;
        let mut attempt = 1;
        loop {
            let result = request()
                .with_subscriber(tracing::subscriber::NoSubscriber::default())
                .await;
            let error = match result {
                Ok(value) => return Ok(value),
                Err(error) => RequestError::from_client(error, &self.secrets),
            };
            if !error.is_transient() || attempt == ATTEMPTS {
                return Err(error);
            }
            tracing::warn!(
                request = request_name,
                attempt,
                attempts = ATTEMPTS,
                delay_ms = delay.as_millis() as u64,
                error = %error,
                "Vault request failed; retrying."
            );
            tokio::time::sleep(delay).await;
            delay *= 2;
            attempt += 1;
        }
    }

    /// Converts a failed request into the error a caller reacts to. `context`
    /// names what failed, and `denied_hint` what to check on HTTP 403.
    pub(super) fn failure(
        &self,
        error: RequestError,
        context: &str,
        denied_hint: &str,
    ) -> VaultError {
        let address = &self.address;
        match error {
            RequestError::Transport { detail, tls: true } => VaultError::Config(format!(
                "{context}: the TLS connection to Vault at {address} failed: {detail}; \
                 set VAULT_CACERT or --vault-cacert to the CA that signed Vault's certificate"
            )),
            RequestError::Transport { detail, tls: false } => VaultError::Unavailable(format!(
                "{context}: Vault at {address} could not be reached after {ATTEMPTS} attempts: {detail}; \
                 rerun when Vault is reachable"
            )),
            error @ RequestError::Status { code: 403, .. } => VaultError::Denied(format!(
                "{context}: Vault at {address} denied access with {}: {denied_hint}",
                self.auth_status(&error)
            )),
            error if error.is_transient() => VaultError::Unavailable(format!(
                "{context}: Vault at {address} was unavailable after {ATTEMPTS} attempts ({error}); \
                 rerun when Vault is available"
            )),
            RequestError::Status { code, errors, .. } if errors.is_empty() => VaultError::Secret(format!(
                "{context}: the server at {address} returned HTTP {code} without a Vault error; \
                 check VAULT_ADDR, including http versus https"
            )),
            error @ RequestError::Status { .. } => VaultError::Secret(format!(
                "{context}: Vault at {address} returned {error}"
            )),
            RequestError::Unexpected(detail) => VaultError::Config(format!(
                "{context}: unexpected response from Vault at {address}: {detail}; check VAULT_ADDR"
            )),
        }
    }

    /// Converts a failed login into the error a caller reacts to. A rejected
    /// login is a credentials problem (exit 2) unless Vault was unreachable or
    /// unavailable.
    fn login_failure(&self, error: RequestError, context: &str, hint: &str) -> VaultError {
        match error {
            RequestError::Status { code: 400, .. } => VaultError::Denied(format!(
                "{context}: Vault at {} rejected it with {error}: {hint}",
                self.address
            )),
            other => self.failure(other, context, hint),
        }
    }

    /// Formats the status of a denied request, with the source of the token
    /// it was sent with once there is one.
    fn auth_status(&self, error: &RequestError) -> String {
        if self.auth.is_empty() {
            error.to_string()
        } else {
            format!("{error} for {}", self.auth)
        }
    }
}

/// A failed request, sorted by what decides the caller's reaction.
#[derive(Debug)]
pub(super) enum RequestError {
    /// No HTTP response: connection refused or reset, DNS failure, time-out,
    /// or a TLS handshake that failed (`tls`), which a retry does not fix.
    Transport { detail: String, tls: bool },
    /// Vault responded with an error status. `errors` is Vault's error list,
    /// and `version` the version metadata that KV v2 sends with the 404 of a
    /// deleted or destroyed version.
    Status {
        code: u16,
        errors: Vec<String>,
        version: Option<VersionState>,
    },
    /// A response that is not Vault's, or a client that could not send.
    Unexpected(String),
}

/// The state of one KV v2 version, as sent with a 404.
#[derive(Debug, serde::Deserialize)]
pub(super) struct VersionState {
    pub version: u64,
    #[serde(default)]
    pub deletion_time: String,
    #[serde(default)]
    pub destroyed: bool,
}

impl RequestError {
    /// Sorts a vaultrs error. Only Vault's own error strings and transport
    /// errors are kept as text, with `secrets` removed from them. Response
    /// bodies are never copied, because a body may contain the key.
    fn from_client(error: ClientError, secrets: &[Zeroizing<String>]) -> RequestError {
        let clean = |text: String| redact(text, secrets);
        match error {
            ClientError::APIError { code, errors } => RequestError::Status {
                code,
                errors: errors.iter().map(|e| clean(tidy_vault_error(e))).collect(),
                version: None,
            },
            ClientError::RestClientError { source } => match source {
                RustifyError::ServerResponseError { code, content } => {
                    let body = content.as_deref().unwrap_or_default();
                    RequestError::Status {
                        code,
                        errors: error_list(body)
                            .iter()
                            .map(|e| clean(tidy_vault_error(e)))
                            .collect(),
                        version: version_state(body),
                    }
                }
                RustifyError::RequestError { source, .. }
                | RustifyError::ResponseError { source } => {
                    let detail = clean(error_chain(source.as_ref()));
                    // NOTE: rustls errors reach us only as text inside reqwest's
                    // error chain, so a failed certificate check is found by
                    // its wording.
                    let tls = detail.to_ascii_lowercase().contains("certificate");
                    RequestError::Transport { detail, tls }
                }
                other => RequestError::Unexpected(clean(other.to_string())),
            },
            other => RequestError::Unexpected(clean(other.to_string())),
        }
    }

    pub(super) fn is_transient(&self) -> bool {
        match self {
            RequestError::Transport { tls, .. } => !tls,
            RequestError::Status { code, .. } => TRANSIENT_STATUSES.contains(code),
            RequestError::Unexpected(_) => false,
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::Transport { detail, .. } => write!(f, "{detail}"),
            RequestError::Status { code, errors, .. } if errors.is_empty() => {
                write!(f, "HTTP {code}")
            }
            RequestError::Status { code, errors, .. } => {
                write!(f, "HTTP {code} ({})", errors.join("; "))
            }
            RequestError::Unexpected(detail) => write!(f, "{detail}"),
        }
    }
}

/// Parses Vault's error strings from an error body, or returns none.
fn error_list(body: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<String>,
    }
    serde_json::from_str::<Errors>(body)
        .map(|e| e.errors)
        .unwrap_or_default()
}

/// Puts one of Vault's error strings on one line. Vault sends some as a Go
/// multi-error, "1 error occurred:\n\t* permission denied\n\n", which
/// becomes "permission denied".
fn tidy_vault_error(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !is_error_count(line))
        .map(|line| line.strip_prefix("* ").unwrap_or(line))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Returns whether a line is a Go multi-error header such as "2 errors occurred:".
fn is_error_count(line: &str) -> bool {
    let Some((count, rest)) = line.split_once(' ') else {
        return false;
    };
    count.bytes().all(|b| b.is_ascii_digit())
        && matches!(rest, "error occurred:" | "errors occurred:")
}

/// Parses the version metadata in a KV v2 404 body: `{"data": {"metadata": {...}}}`.
fn version_state(body: &str) -> Option<VersionState> {
    #[derive(serde::Deserialize)]
    struct Body {
        data: Option<Data>,
    }
    #[derive(serde::Deserialize)]
    struct Data {
        metadata: Option<VersionState>,
    }
    serde_json::from_str::<Body>(body).ok()?.data?.metadata
}

/// Joins the error and its causes with ": ".
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Secrets shorter than this are not searched for, because a short one (such
/// as a dev server's root token `root`) also matches ordinary words. Tokens,
/// secret IDs and JWTs that Vault and Kubernetes issue are much longer.
const MIN_REDACTED_CHARS: usize = 8;

/// Replaces every occurrence of a secret in `text`.
fn redact(text: String, secrets: &[Zeroizing<String>]) -> String {
    // A transport error quotes the request's URL, which carries the
    // address's credentials. They are removed whatever their length.
    let mut text = without_url_credentials(&text);
    for secret in secrets.iter().filter(|s| s.len() >= MIN_REDACTED_CHARS) {
        if text.contains(secret.as_str()) {
            text = text.replace(secret.as_str(), "[redacted]");
        }
    }
    text
}

/// Parses VAULT_ADDR, which is required and must be an http or https URL.
fn address(value: Option<&str>) -> Result<reqwest::Url, VaultError> {
    let text = value.map(str::trim).filter(|t| !t.is_empty()).ok_or_else(|| {
        VaultError::Config(
            "a key is to come from Vault, but no Vault address is set: set VAULT_ADDR or --vault-addr"
                .into(),
        )
    })?;
    // An address that does not parse may keep a password past what
    // `without_url_credentials` recognizes, so one with an `@` left is not shown.
    let mut display = without_url_credentials(text);
    if display.contains('@') {
        display = "(not shown, because it contains '@')".to_string();
    }
    let url = reqwest::Url::parse(text).map_err(|e| {
        VaultError::Config(format!(
            "invalid Vault address {display:?} (VAULT_ADDR or --vault-addr): {e}; expected e.g. https://vault.example.com:8200"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(VaultError::Config(format!(
            "invalid Vault address {display:?} (VAULT_ADDR or --vault-addr): the scheme must be http or https"
        )));
    }
    Ok(url)
}

/// Returns `text` with the user and password removed from each URL in it:
/// whatever lies between `://` and the last `@` of the authority, which
/// ends at `/`, `?`, `#`, whitespace, a quote or a closing bracket.
fn without_url_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(found) = rest.find("://") {
        let authority_start = found + 3;
        out.push_str(&rest[..authority_start]);
        let after = &rest[authority_start..];
        let authority_end = after
            .find(|c: char| {
                matches!(c, '/' | '?' | '#' | '"' | '\'' | ')' | ']' | '>') || c.is_whitespace()
            })
            .unwrap_or(after.len());
        let authority = &after[..authority_end];
        match authority.rfind('@') {
            Some(at) => out.push_str(&authority[at + 1..]),
            None => out.push_str(authority),
        }
        rest = &after[authority_end..];
    }
    out.push_str(rest);
    out
}

/// Lists the CA files: --vault-cacert and every file in --vault-capath.
fn ca_certificates(args: &VaultArgs) -> Result<Vec<String>, VaultError> {
    let mut paths: Vec<PathBuf> = Vec::new();
    if let Some(file) = &args.vault_cacert {
        if !file.is_file() {
            return Err(VaultError::Config(format!(
                "the Vault CA certificate file {} (VAULT_CACERT or --vault-cacert) does not exist or is not a file",
                file.display()
            )));
        }
        paths.push(file.clone());
    }
    if let Some(directory) = &args.vault_capath {
        let entries = std::fs::read_dir(directory).map_err(|e| {
            VaultError::Config(format!(
                "cannot read the Vault CA directory {} (VAULT_CAPATH or --vault-capath): {e}",
                directory.display()
            ))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| path.is_file())
            .collect();
        files.sort();
        paths.extend(files);
    }
    paths
        .into_iter()
        .map(|path| {
            path.to_str().map(str::to_string).ok_or_else(|| {
                VaultError::Config(format!(
                    "the Vault CA certificate path {} is not valid UTF-8",
                    path.display()
                ))
            })
        })
        .collect()
}

/// Chooses the auth method: --vault-auth, or the one whose settings are given.
fn auth_method(args: &VaultArgs) -> Result<AuthMethod, VaultError> {
    if let Some(method) = args.vault_auth {
        return Ok(method);
    }
    let approle = given(&args.vault_role_id).is_some() || args.vault_role_id_file.is_some();
    let kubernetes = given(&args.vault_k8s_role).is_some();
    match (approle, kubernetes) {
        (true, true) => Err(VaultError::Config(
            "both an AppRole role ID and a Kubernetes role are set; choose the Vault auth method with --vault-auth or REENCRYPT_VAULT_AUTH".into(),
        )),
        (true, false) => Ok(AuthMethod::Approle),
        (false, true) => Ok(AuthMethod::Kubernetes),
        (false, false) => Ok(AuthMethod::Token),
    }
}

/// Reads the credentials of the chosen auth method from files and the environment.
fn credentials(args: &VaultArgs) -> Result<Credentials, VaultError> {
    match auth_method(args)? {
        AuthMethod::Token => {
            let (token, source) = token(args)?;
            Ok(Credentials::Token { token, source })
        }
        AuthMethod::Approle => Ok(Credentials::AppRole {
            mount: mount_name(&args.vault_approle_mount, "--vault-approle-mount")?,
            role_id: role_id(args)?,
            secret_id: secret_id(args)?,
        }),
        AuthMethod::Kubernetes => Ok(Credentials::Kubernetes(kubernetes_login(args)?)),
    }
}

/// Reads the token from --vault-token-file, else VAULT_TOKEN, else
/// ~/.vault-token. Returns it with a description of its source.
fn token(args: &VaultArgs) -> Result<(Zeroizing<String>, String), VaultError> {
    if let Some(path) = &args.vault_token_file {
        let token = read_secret_file(path, "Vault token file (--vault-token-file)")?;
        return Ok((token, format!("the file {}", path.display())));
    }
    if let Some(value) = std::env::var_os("VAULT_TOKEN") {
        let value = Zeroizing::new(value.to_string_lossy().into_owned());
        if !value.trim().is_empty() {
            let token = Zeroizing::new(value.trim().to_string());
            check_header_safe(&token, "Vault token in VAULT_TOKEN")?;
            return Ok((token, "VAULT_TOKEN".into()));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let path = Path::new(&home).join(".vault-token");
        if path.exists() {
            let token = read_secret_file(&path, "Vault token file")?;
            return Ok((token, path.display().to_string()));
        }
    }
    Err(VaultError::Config(
        "a key is to come from Vault, but no Vault token is set: set VAULT_TOKEN, pass --vault-token-file, \
         or run `vault login` (which writes ~/.vault-token); or log in with --vault-auth approle or kubernetes"
            .into(),
    ))
}

/// Reads the AppRole role ID from --vault-role-id or --vault-role-id-file.
fn role_id(args: &VaultArgs) -> Result<String, VaultError> {
    match (given(&args.vault_role_id), &args.vault_role_id_file) {
        (Some(_), Some(_)) => Err(VaultError::Config(
            "the AppRole role ID is given twice: use --vault-role-id or --vault-role-id-file, not both".into(),
        )),
        (Some(role_id), None) => {
            check_header_safe(role_id, "AppRole role ID")?;
            Ok(role_id.to_string())
        }
        (None, Some(path)) => {
            let role_id = read_secret_file(path, "AppRole role ID file (--vault-role-id-file)")?;
            Ok(role_id.to_string())
        }
        (None, None) => Err(VaultError::Config(
            "AppRole login needs a role ID: set --vault-role-id or REENCRYPT_VAULT_ROLE_ID, or --vault-role-id-file".into(),
        )),
    }
}

/// Reads the AppRole secret ID from --vault-secret-id-file or REENCRYPT_VAULT_SECRET_ID.
fn secret_id(args: &VaultArgs) -> Result<Zeroizing<String>, VaultError> {
    let from_env = std::env::var_os("REENCRYPT_VAULT_SECRET_ID")
        .map(|v| Zeroizing::new(v.to_string_lossy().trim().to_string()))
        .filter(|v| !v.is_empty());
    match (&args.vault_secret_id_file, from_env) {
        (Some(_), Some(_)) => Err(VaultError::Config(
            "the AppRole secret ID is given twice: use --vault-secret-id-file (REENCRYPT_VAULT_SECRET_ID_FILE) \
             or REENCRYPT_VAULT_SECRET_ID, not both"
                .into(),
        )),
        (Some(path), None) => {
            read_secret_file(path, "AppRole secret ID file (--vault-secret-id-file)")
        }
        (None, Some(secret_id)) => {
            check_header_safe(&secret_id, "AppRole secret ID in REENCRYPT_VAULT_SECRET_ID")?;
            Ok(secret_id)
        }
        (None, None) => Err(VaultError::Config(
            "AppRole login needs a secret ID: set --vault-secret-id-file, REENCRYPT_VAULT_SECRET_ID_FILE \
             or REENCRYPT_VAULT_SECRET_ID"
                .into(),
        )),
    }
}

/// Reads a file holding one secret, without surrounding whitespace. Errors
/// name the file and never show its content.
fn read_secret_file(path: &Path, description: &str) -> Result<Zeroizing<String>, VaultError> {
    let text = std::fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| {
            VaultError::Config(format!(
                "cannot read the {description} {}: {e}",
                path.display()
            ))
        })?;
    let value = Zeroizing::new(text.trim().to_string());
    if value.is_empty() {
        return Err(VaultError::Config(format!(
            "the {description} {} is empty",
            path.display()
        )));
    }
    check_header_safe(&value, &format!("{description} {}", path.display()))?;
    Ok(value)
}

/// Rejects values that cannot be sent in an HTTP header (vaultrs panics on
/// them). The message never shows the value.
fn check_header_safe(value: &str, description: &str) -> Result<(), VaultError> {
    if value.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(VaultError::Config(format!(
            "the {description} contains spaces, control or non-ASCII characters, which Vault does not accept"
        )))
    }
}

/// An auth mount path without surrounding slashes; it must not be empty.
fn mount_name(value: &str, option: &str) -> Result<String, VaultError> {
    let mount = value.trim().trim_matches('/');
    if mount.is_empty() {
        return Err(VaultError::Config(format!("{option} must not be empty")));
    }
    Ok(mount.to_string())
}

/// Returns a text option's value when it is set and not blank.
fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> VaultArgs {
        VaultArgs::default()
    }

    #[test]
    fn auth_method_follows_given_settings() {
        assert_eq!(auth_method(&args()).unwrap(), AuthMethod::Token);

        let approle = VaultArgs {
            vault_role_id: Some("role".into()),
            ..args()
        };
        assert_eq!(auth_method(&approle).unwrap(), AuthMethod::Approle);

        let kubernetes = VaultArgs {
            vault_k8s_role: Some("reencrypt".into()),
            ..args()
        };
        assert_eq!(auth_method(&kubernetes).unwrap(), AuthMethod::Kubernetes);

        let blank = VaultArgs {
            vault_role_id: Some("  ".into()),
            ..args()
        };
        assert_eq!(auth_method(&blank).unwrap(), AuthMethod::Token);
    }

    #[test]
    fn auth_method_rejects_two_methods_unless_chosen() {
        let both = VaultArgs {
            vault_role_id: Some("role".into()),
            vault_k8s_role: Some("reencrypt".into()),
            ..args()
        };
        let error = auth_method(&both).unwrap_err();
        assert!(error.to_string().contains("--vault-auth"), "{error}");

        let chosen = VaultArgs {
            vault_auth: Some(AuthMethod::Kubernetes),
            ..both
        };
        assert_eq!(auth_method(&chosen).unwrap(), AuthMethod::Kubernetes);
    }

    #[test]
    fn kubernetes_login_reads_role_and_jwt_file() {
        let dir = tempfile::tempdir().unwrap();
        let jwt_file = dir.path().join("token");
        std::fs::write(&jwt_file, "header.payload.signature\n").unwrap();
        let login = kubernetes_login(&VaultArgs {
            vault_k8s_role: Some("reencrypt".into()),
            vault_k8s_jwt_file: jwt_file,
            vault_k8s_mount: "/k8s-prod/".into(),
            ..args()
        })
        .unwrap();

        assert_eq!(login.mount, "k8s-prod");
        assert_eq!(login.role, "reencrypt");
        assert_eq!(login.jwt.as_str(), "header.payload.signature");
        let debug = format!("{login:?}");
        assert!(!debug.contains("payload"), "{debug}");
    }

    #[test]
    fn kubernetes_login_defaults_to_service_account_token() {
        let error = kubernetes_login(&VaultArgs {
            vault_k8s_role: Some("reencrypt".into()),
            ..args()
        })
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains(super::super::DEFAULT_K8S_JWT_FILE),
            "{error}"
        );
        assert_eq!(error.exit_code(), crate::exit::CONFIG);
    }

    #[test]
    fn kubernetes_login_needs_role() {
        let error = kubernetes_login(&args()).unwrap_err();
        assert!(error.to_string().contains("--vault-k8s-role"), "{error}");
    }

    #[test]
    fn secret_file_errors_hide_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "hvs.abc def\n").unwrap();
        let error = read_secret_file(&path, "Vault token file").unwrap_err();
        assert!(error.to_string().contains("spaces"), "{error}");
        assert!(!error.to_string().contains("hvs.abc"), "{error}");

        std::fs::write(&path, " \n").unwrap();
        let error = read_secret_file(&path, "Vault token file").unwrap_err();
        assert!(error.to_string().ends_with("is empty"), "{error}");
    }

    #[test]
    fn url_credentials_are_removed() {
        let cases = [
            (
                "http://admin:Passw0rd@127.0.0.1:8200",
                "http://127.0.0.1:8200",
            ),
            (
                "https://u:p@vault:8200/v1/secret",
                "https://vault:8200/v1/secret",
            ),
            ("https://only-user@vault", "https://vault"),
            ("http://a:p%40ss@h/x?y#z", "http://h/x?y#z"),
            (
                "error sending request for url (http://a:b@h:1/v1/k): refused, see https://x:y@z",
                "error sending request for url (http://h:1/v1/k): refused, see https://z",
            ),
            ("no url here: a:b@c", "no url here: a:b@c"),
            ("http://vault:8200", "http://vault:8200"),
            ("http://", "http://"),
        ];
        for (text, expected) in cases {
            assert_eq!(without_url_credentials(text), expected, "{text}");
        }
        let short = vec![Zeroizing::new("tt".to_string())];
        assert_eq!(
            redact("for url (http://u:pw@h/v1)".into(), &short),
            "for url (http://h/v1)"
        );
    }

    #[test]
    fn invalid_address_hides_credentials() {
        let error = address(Some("http://admin:Passw0rd@vault:notaport")).unwrap_err();
        assert!(!error.to_string().contains("Passw0rd"), "{error}");
        assert!(
            error.to_string().contains("http://vault:notaport"),
            "{error}"
        );
        let error = address(Some("http://admin:pa/ss@vault:8200")).unwrap_err();
        assert!(!error.to_string().contains("admin:pa"), "{error}");
        assert!(!error.to_string().contains("ss@vault"), "{error}");
    }

    #[test]
    fn redact_removes_every_secret() {
        let secrets = vec![
            Zeroizing::new("s3cr3t-token".to_string()),
            Zeroizing::new("tt".to_string()),
            Zeroizing::new(String::new()),
        ];
        assert_eq!(
            redact("https: bad s3cr3t-token and s3cr3t-token".into(), &secrets),
            "https: bad [redacted] and [redacted]"
        );
    }

    #[test]
    fn version_state_reads_kv_404_body() {
        let body = r#"{"data":{"data":null,"metadata":{"created_time":"t","deletion_time":"2026-01-01T00:00:00Z","destroyed":false,"version":4}}}"#;
        let state = version_state(body).unwrap();
        assert_eq!(state.version, 4);
        assert_eq!(state.deletion_time, "2026-01-01T00:00:00Z");
        assert!(!state.destroyed);
        assert!(version_state(r#"{"errors":[]}"#).is_none());
        assert_eq!(
            error_list(r#"{"errors":["permission denied"]}"#),
            ["permission denied"]
        );
    }

    #[test]
    fn vault_multi_errors_become_one_line() {
        assert_eq!(
            tidy_vault_error("1 error occurred:\n\t* permission denied\n\n"),
            "permission denied"
        );
        assert_eq!(
            tidy_vault_error("2 errors occurred:\n\t* first\n\t* second\n\n"),
            "first; second"
        );
        assert_eq!(
            tidy_vault_error("invalid role or secret ID"),
            "invalid role or secret ID"
        );
    }

    #[test]
    fn address_is_required_and_checked() {
        assert!(address(None)
            .unwrap_err()
            .to_string()
            .contains("VAULT_ADDR"));
        assert!(address(Some("vault:8200")).is_err());
        assert!(address(Some("ftp://vault")).is_err());
        assert_eq!(
            address(Some(" http://127.0.0.1:8200 ")).unwrap().as_str(),
            "http://127.0.0.1:8200/"
        );
    }
}
