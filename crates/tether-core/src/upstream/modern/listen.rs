//! The link's `subscriptions/listen` stream to a 2026-07-28 server: opened for the
//! notifications the session layer expects (list changes, subscribed resources) and
//! reopened with backoff when it drops.
//!
//! Must not: reopen faster than its backoff, or hold more subscriptions than its bound.

use super::*;

impl Inner {
    /// (Re)opens the listen stream for what the session needs now: the server's
    /// list-changed kinds and the client's resource subscriptions.
    pub(super) fn listen(self: &Arc<Self>) {
        let (request, token) = {
            let mut st = self.lock();
            if let Some(old) = st.listen.take() {
                old.cancel();
            }
            let resources: Vec<String> = st.subscriptions.iter().cloned().collect();
            let id = Value::from(format!(
                "listen-{}",
                self.next.fetch_add(1, Ordering::Relaxed)
            ));
            let Some(mut request) = modern::listen_request(id, &st.server_capabilities, &resources)
            else {
                return;
            };
            st.client.stamp(&mut request);
            let token = self.stop.child_token();
            st.listen = Some(token.clone());
            (request, token)
        };
        let me = self.clone();
        self.spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = me.keep_listening(request) => {}
            }
        });
    }

    pub(super) async fn keep_listening(&self, request: Value) {
        let mut wait = Duration::from_secs(1);
        loop {
            let resp = self
                .client
                .post(&self.url)
                .headers(self.headers(&request))
                .json(&request)
                .send()
                .await;
            match resp {
                Ok(r) if r.status().is_success() && is_event_stream(r.headers()) => {
                    let mut events = sse::events(r, self.opts.max_message);
                    while let Some(Ok(item)) = events.next().await {
                        let SseItem::Event(ev) = item else {
                            tracing::warn!(url = %self.url, limit = self.opts.max_message, "listen stream event over the size limit (--max-upstream-message) skipped");
                            continue;
                        };
                        let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                            continue;
                        };
                        if v.get("method").is_none() {
                            // The listen request's result: the server ended it gracefully.
                            break;
                        }
                        wait = Duration::from_secs(1);
                        if let Some(note) = modern::from_listen(v) {
                            self.emit(note, None).await;
                        }
                    }
                }
                Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                    tracing::debug!(url = %self.url, status = r.status().as_u16(), "listen stream refused for now; trying again");
                }
                Ok(r) => {
                    // Refused (a 4xx, or JSON where a stream was due): the server does not
                    // carry these notifications; asking again will not change that.
                    let status = r.status();
                    let body = error_body(r).await;
                    tracing::info!(url = %self.url, status = status.as_u16(), body = %crate::log_limit::cut(&body, 200), "upstream refused subscriptions/listen; change notifications will not reach this session");
                    return;
                }
                Err(e) => {
                    tracing::debug!(url = %self.url, error = %error_chain(&e), "listen stream failed");
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(LISTEN_BACKOFF_MAX);
        }
    }
}
