//! A headless Chromium for the web page's test, driven over the DevTools protocol: Debian's
//! `chromium` started with a fresh profile and `--remote-debugging-port=0` (the port is read
//! from `DevToolsActivePort` in the profile), one page target attached in flat mode over the
//! browser's websocket, `Runtime.evaluate` to read the DOM and click, `Page.captureScreenshot`.
//! The browser and its profile go away when the [`Browser`] is dropped.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// The Chromium binary (Debian's package; `$VMHA_CHROMIUM` overrides it).
pub fn chromium() -> String {
    std::env::var("VMHA_CHROMIUM").unwrap_or_else(|_| "chromium".to_string())
}

/// A running headless Chromium with one page.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: WebSocket<TcpStream>,
    session: String,
    next_id: u64,
}

impl Browser {
    /// Starts Chromium and opens a blank page of `width`×`height` CSS pixels.
    pub fn start(width: u32, height: u32) -> Browser {
        let profile = tempfile::Builder::new()
            .prefix("vmha-chromium.")
            .tempdir_in("/tmp")
            .expect("profile dir");
        let child = Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-quic",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} (install chromium): {e}", chromium()));
        let mut browser_child = BrowserChild(Some(child));
        let (port, path) = devtools_port(profile.path(), &mut browser_child);
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("DevTools port");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("read timeout");
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("DevTools websocket");
        let mut b = Browser {
            child: browser_child.take(),
            _profile: profile,
            ws,
            session: String::new(),
            next_id: 0,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        b.call("Page.enable", json!({}));
        // A target in the background is painted lazily: screenshots would show old frames.
        b.call("Page.bringToFront", json!({}));
        b.call("Runtime.enable", json!({}));
        b.resize(width, height, false);
        b
    }

    /// Sets the page's viewport (`mobile`: a phone's, with touch and device scale 2).
    pub fn resize(&mut self, width: u32, height: u32, mobile: bool) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height,
                   "deviceScaleFactor": if mobile { 2 } else { 1 }, "mobile": mobile}),
        );
    }

    /// Sends a command (to the page once attached) and waits for its answer; panics on a
    /// protocol error.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("sending {method}: {e}"));
        loop {
            let reply = match self.ws.read() {
                Ok(Message::Text(t)) => serde_json::from_str::<Value>(&t).expect("CDP JSON"),
                Ok(_) => continue,
                Err(e) => panic!("reading the answer to {method}: {e}"),
            };
            if reply["id"] != id {
                continue; // an event
            }
            if let Some(err) = reply.get("error") {
                panic!("{method} failed: {err}");
            }
            return reply["result"].clone();
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise) and returns its value as JSON.
    pub fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("evaluating {expr:?}: {ex}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expr` evaluates to something truthy (checked every 100 ms, for at most
    /// `timeout`); returns it. Panics with `what` and the page's text otherwise.
    pub fn wait(&mut self, what: &str, expr: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expr);
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return v;
            }
            if Instant::now() > deadline {
                let text = self.eval("document.body ? document.body.innerText : ''");
                panic!(
                    "timed out waiting until {what}; the page shows:\n{}",
                    text.as_str().unwrap_or("")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Loads `url` and waits until its document is complete.
    pub fn open(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.wait(
            "the page loaded",
            &format!(
                "location.href === {} && document.readyState === 'complete'",
                json!(url)
            ),
            Duration::from_secs(60),
        );
    }

    /// Saves a PNG screenshot of the viewport (`full`: of the whole page) to `path`.
    pub fn screenshot(&mut self, path: &Path, full: bool) {
        // Two animation frames: what the DOM holds now is painted.
        self.eval(
            "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))",
        );
        let mut params = json!({"format": "png"});
        if full {
            let size = self.call("Page.getLayoutMetrics", json!({}))["cssContentSize"].clone();
            params["captureBeyondViewport"] = json!(true);
            params["clip"] = json!({"x": 0, "y": 0, "width": size["width"],
                                    "height": size["height"], "scale": 1});
        }
        let shot = self.call("Page.captureScreenshot", params);
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artifact dir");
        }
        std::fs::write(path, png).expect("writing the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the browser if starting it fails half-way.
struct BrowserChild(Option<Child>);

impl BrowserChild {
    fn take(&mut self) -> Child {
        self.0.take().expect("browser child")
    }
}

impl Drop for BrowserChild {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The DevTools port and browser path, from `DevToolsActivePort` once Chromium wrote it.
fn devtools_port(profile: &Path, child: &mut BrowserChild) -> (u16, String) {
    let file = profile.join("DevToolsActivePort");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next())
                    && let Ok(port) = port.trim().parse()
                {
                    return (port, path.trim().to_string());
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => panic!("reading {}: {e}", file.display()),
        }
        if let Some(c) = child.0.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!("chromium exited at start: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "chromium never wrote DevToolsActivePort"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
