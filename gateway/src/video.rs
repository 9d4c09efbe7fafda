//! Video scoring. The worker streams sampled frames into slots this module
//! grants it, a bounded window per request so one long video cannot take the
//! whole pool; each frame goes to the executor as soon as it is written, so
//! inference overlaps decode and frames share batches with other requests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use serde_json::{Map, Value};
use shm::{
    FromWorker, Ledger, RequestContext, SampleMode, Sampling, SlotLease, ToWorker, VideoDone,
    VideoJob,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::AppState;
use crate::auth::Caller;
use crate::children::Exit;
use crate::error::{ApiError, Code};
use crate::score::Timings;
use crate::workers::{Held, QueuedUpload, Task, WorkJob, WorkerThread, lease_within};

/// A video job's side of the queue.
#[derive(Debug)]
pub struct VideoTask {
    pub sampling: Sampling,
    pub window: u32,
    pub events: mpsc::UnboundedSender<VideoEvent>,
}

/// What the dispatcher tells the request handler.
#[derive(Debug)]
pub enum VideoEvent {
    /// A worker thread took the video and it holds its first slot, after
    /// `queue` in the queue.
    Started {
        queue: Duration,
    },
    /// A frame is in shared memory; `grant` goes to the executor with it.
    Frame {
        grant: Grant,
        t: f64,
    },
    Done(VideoDone),
    Failed(ApiError),
}

/// A slot of the request's window: dropping it frees both.
#[derive(Debug)]
pub struct Grant {
    lease: SlotLease,
    _window: OwnedSemaphorePermit,
}

/// The first slot of a video: it waits in the queue like an image does.
async fn first_grant(
    window: &Arc<Semaphore>,
    core: &crate::core::Core,
    model: u16,
    since: Instant,
    critical: bool,
) -> Result<Grant, ApiError> {
    let permit = window.clone().try_acquire_owned().expect("a fresh window");
    let lease = lease_within(core, model, since, critical).await?;
    Ok(Grant {
        lease,
        _window: permit,
    })
}

/// More slots for a running video, as its window and the pool allow. The
/// worker's own deadline bounds how long it waits for them.
async fn next_grant(window: Arc<Semaphore>, ledger: &Ledger, model: u16) -> Option<Grant> {
    let permit = window.acquire_owned().await.ok()?;
    let lease = ledger.lease(model).await.ok()?;
    Some(Grant {
        lease,
        _window: permit,
    })
}

/// A slot now, if the window and the pool have one.
fn try_grant(window: &Arc<Semaphore>, ledger: &Ledger, model: u16) -> Option<Grant> {
    let permit = window.clone().try_acquire_owned().ok()?;
    let lease = ledger.try_lease(model).ok()??;
    Some(Grant {
        lease,
        _window: permit,
    })
}

impl WorkerThread<'_> {
    pub(crate) async fn run_video(
        &self,
        job_id: u64,
        upload: QueuedUpload,
        task: VideoTask,
    ) -> Result<(), Held> {
        let QueuedUpload {
            ctx,
            model,
            data,
            enqueued,
            pending,
            claim: _,
        } = upload;
        let VideoTask {
            sampling,
            window,
            events,
        } = task;
        let fail = |e: ApiError| {
            let _ = events.send(VideoEvent::Failed(e.for_video()));
        };
        let input = match self.place_input(&data) {
            Ok(i) => i,
            Err(e) => {
                fail(e);
                return Ok(());
            }
        };
        let sem = Arc::new(Semaphore::new(window as usize));
        // One slot is enough to start; waiting for a whole window while
        // holding part of it could deadlock several videos against each other.
        // A critical video's first slot may be a reserved one, so it starts
        // at once; its others come from the general pool.
        let critical = ctx.class == config::Class::Critical;
        let first = match first_grant(&sem, self.core, model, enqueued, critical).await {
            Ok(g) => g,
            Err(e) => {
                fail(e);
                return Ok(());
            }
        };
        let _ = events.send(VideoEvent::Started {
            queue: enqueued.elapsed(),
        });
        let ledger = &self.core.ledger;
        let mut held: HashMap<u32, Grant> = std::iter::once(first)
            .chain(std::iter::from_fn(|| try_grant(&sem, ledger, model)))
            .map(|g| (g.lease.slot().slot, g))
            .collect();
        let slots = held.values().map(|g| g.lease.slot()).collect();
        let deadline_ms = sampling.deadline_ms;
        let msg = ToWorker::Video(VideoJob {
            job_id,
            ctx,
            model,
            input,
            sampling,
            slots,
        });
        let lost = |held: HashMap<u32, Grant>, events| {
            Held::new(held.into_values().map(|g| g.lease).collect(), events)
        };
        let Ok(mut rx) = self.link.expect(job_id, Vec::new()) else {
            return Err(lost(held, events));
        };
        if self.link.send(&msg).is_err() {
            return Err(lost(held, events));
        }
        let limit = tokio::time::sleep(crate::workers::hung_after(deadline_ms));
        tokio::pin!(limit);
        let mut cancelled = false;
        // Kept across turns so the video keeps its place in the pool's queue.
        let mut more = Box::pin(next_grant(sem.clone(), ledger, model));
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(FromWorker::Frame(f)) => {
                        if let Some(grant) = held.remove(&f.slot.slot) {
                            let _ = events.send(VideoEvent::Frame { grant, t: f.t });
                        }
                    }
                    Some(FromWorker::VideoDone(d)) => {
                        let _ = events.send(VideoEvent::Done(d));
                        break;
                    }
                    Some(FromWorker::Failed { error, .. }) => {
                        fail(error.into());
                        break;
                    }
                    Some(_) => {}
                    None => return Err(lost(held, events)),
                },
                g = &mut more, if !cancelled => {
                    more = Box::pin(next_grant(sem.clone(), ledger, model));
                    let Some(g) = g else { continue };
                    let slot = g.lease.slot();
                    held.insert(slot.slot, g);
                    if self.link.send(&ToWorker::Grant { job_id, slot }).is_err() {
                        return Err(lost(held, events));
                    }
                }
                _ = events.closed(), if !cancelled => {
                    cancelled = true;
                    if self.link.send(&ToWorker::Cancel { job_id }).is_err() {
                        return Err(lost(held, events));
                    }
                }
                _ = &mut limit => {
                    fail(ApiError::new(
                        Code::DecodeDeadlineExceeded,
                        format!("the video took longer than video.decode_deadline_ms = {deadline_ms} ms"),
                    ));
                    self.link.kill(Exit::Killed);
                    return Err(lost(held, events));
                }
            }
        }
        drop(pending);
        let _ = self.input.recycle(self.k, data.len());
        Ok(())
    }
}

/// Sampling options from the query string (`fps`, `frames`, `keyframes`,
/// `start`, `end`, `threshold`), resolved against server and tenant caps.
pub fn sampling_from_query(
    q: &HashMap<String, String>,
    v: &config::VideoLimits,
    tenant_max_frames: u32,
) -> Result<(Sampling, f32), ApiError> {
    let bad = |m: String| ApiError::new(Code::BadRequest, m);
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        q.get(k)
            .map(|s| match s.parse::<f64>() {
                Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
                _ => Err(bad(format!(
                    "query parameter {k}={s:?} must be a number >= 0"
                ))),
            })
            .transpose()
    };
    let max_frames = match tenant_max_frames {
        0 => v.max_frames,
        t => t.min(v.max_frames),
    };
    let keyframes = match q.get("keyframes").map(String::as_str) {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => return Err(bad(format!("keyframes={other:?} must be true or false"))),
    };
    let mode = match (num("fps")?, num("frames")?) {
        (Some(_), Some(_)) => return Err(bad("give fps= or frames=, not both".into())),
        (Some(f), None) if f <= 0.0 || f > 240.0 => {
            return Err(bad(format!("fps={f} must be in (0, 240]")));
        }
        (Some(f), None) => SampleMode::Fps(f),
        (None, Some(n)) if n < 1.0 || n.fract() != 0.0 => {
            return Err(bad(format!("frames={n} must be a whole number >= 1")));
        }
        (None, Some(n)) if n > max_frames as f64 => {
            return Err(ApiError::new(
                Code::TooManyImages,
                format!("frames={n} exceeds the limit of {max_frames} sampled frames per video"),
            ));
        }
        (None, Some(n)) => SampleMode::Count(n as u32),
        (None, None) if keyframes => SampleMode::All,
        (None, None) => SampleMode::Fps(v.default_fps),
    };
    let start = num("start")?.unwrap_or(0.0);
    let end = num("end")?;
    if end.is_some_and(|e| e <= start) {
        return Err(bad(format!(
            "end={} must be after start={start}",
            end.unwrap_or(0.0)
        )));
    }
    let threshold = match num("threshold")? {
        Some(t) if t > 1.0 => return Err(bad(format!("threshold={t} must be in [0, 1]"))),
        Some(t) => t as f32,
        None => v.default_threshold,
    };
    let sampling = Sampling {
        mode,
        keyframes_only: keyframes,
        start,
        end,
        max_frames,
        max_decoded: v.max_decoded_frames,
        max_decoded_pixels: v.max_decoded_pixels,
        max_duration: v.max_duration_s,
        deadline_ms: v.decode_deadline_ms,
        decode_threads: v.decode_threads,
    };
    Ok((sampling, threshold))
}

#[derive(Debug, Serialize)]
pub struct VideoResponse {
    pub request_id: String,
    pub model: String,
    pub media: &'static str,
    pub codec: String,
    pub width: u32,
    pub height: u32,
    pub duration: f64,
    pub frames_decoded: u32,
    pub frames_sampled: u32,
    pub complete: bool,
    pub truncated: bool,
    pub frames: Vec<FrameScores>,
    pub aggregate: Aggregate,
    pub timings: Timings,
    /// What was reduced because the gateway was loaded, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub degraded: Option<crate::degrade::Degraded>,
}

#[derive(Debug, Serialize)]
pub struct FrameScores {
    pub t: f64,
    pub scores: Map<String, Value>,
}

#[derive(Debug, Serialize)]
pub struct Aggregate {
    pub max: Map<String, Value>,
    pub mean: Map<String, Value>,
    pub threshold: f32,
    /// Per label, the times of frames scoring at or above `threshold`.
    pub above: Map<String, Value>,
}

/// Per label max and mean over frames, and the frames at or above `threshold`.
pub fn aggregate(labels: &[String], frames: &[(f64, Vec<f32>)], threshold: f32) -> Aggregate {
    let (mut max, mut mean, mut above) = (Map::new(), Map::new(), Map::new());
    for (i, l) in labels.iter().enumerate() {
        let vals = frames.iter().map(|(_, v)| v[i]);
        let m = vals.clone().fold(f32::NAN, f32::max);
        let avg = vals.sum::<f32>() / frames.len().max(1) as f32;
        let ts: Vec<Value> = frames
            .iter()
            .filter(|(_, v)| v[i] >= threshold)
            .map(|(t, _)| Value::from(*t))
            .collect();
        max.insert(
            l.clone(),
            if m.is_nan() {
                Value::Null
            } else {
                Value::from(m as f64)
            },
        );
        mean.insert(l.clone(), Value::from(avg as f64));
        above.insert(l.clone(), Value::Array(ts));
    }
    Aggregate {
        max,
        mean,
        threshold,
        above,
    }
}

/// Runs one video: queue it, score frames as they stream in, assemble.
pub async fn score_video(
    app: &AppState,
    ctx: &RequestContext,
    caller: &Caller,
    model: u16,
    data: Bytes,
    sampling: Sampling,
    threshold: f32,
) -> Result<VideoResponse, ApiError> {
    let started = Instant::now();
    let core = &app.core;
    let (events, mut rx) = mpsc::unbounded_channel();
    let window = core.cfg.video.slots_per_request;
    // Scheduled by the frames it may sample.
    let job_ctx = ctx.costing(sampling.max_frames);
    let task = Task::Video(VideoTask {
        sampling,
        window,
        events,
    });
    let job = WorkJob::new(core, &job_ctx, model, data, task);
    let (claim, enqueued) = (job.claim(), job.upload.enqueued);
    app.workers.submit(job)?;
    let _abandon = claim.abandon_on_drop();
    // Until the first event, the job may still be queued: past the queue
    // deadline it is abandoned.
    let queued_until = crate::workers::queue_deadline(core, enqueued);
    let mut taken = false;
    let mut taken_frames = 0u32;
    let mut queue = Duration::ZERO;
    let mut inflight = FuturesUnordered::new();
    let mut frames: Vec<(f64, Vec<f32>)> = Vec::new();
    let (mut done, mut open) = (None, true);
    let mut t = Timings::default();
    while open || !inflight.is_empty() {
        tokio::select! {
            () = tokio::time::sleep_until(queued_until), if !taken => {
                crate::workers::give_up_if_queued(core, &claim)?;
                taken = true;
            }
            ev = rx.recv(), if open => match ev {
                Some(VideoEvent::Frame { grant, t }) => {
                    // Each frame is a sample of the tenant's rate: the first
                    // was taken to start; the others are charged as they
                    // come, so a video cut short still pays for its work.
                    if taken_frames > 0 {
                        caller.charge_samples(1);
                    }
                    taken_frames += 1;
                    taken = true;
                    inflight.push(async move {
                        let Grant { lease, _window } = grant;
                        (t, crate::score::infer_sample(app, ctx, model, lease).await)
                    });
                }
                Some(VideoEvent::Started { queue: q }) => {
                    taken = true;
                    queue = q;
                    t.queue_ms = crate::score::ms(q);
                }
                Some(VideoEvent::Done(d)) => {
                    taken = true;
                    let decode = Duration::from_micros(d.decode_us);
                    crate::score::observe_preprocess(core, queue, decode);
                    done = Some(d);
                }
                Some(VideoEvent::Failed(e)) => return Err(e),
                None => open = false,
            },
            Some((ft, r)) = inflight.next() => {
                let s = r?;
                t.batch_wait_ms = t.batch_wait_ms.max(s.queue_us as f64 / 1e3);
                t.inference_ms += s.infer_us as f64 / 1e3;
                frames.push((ft, s.values));
            }
        }
    }
    let d = done.ok_or_else(|| {
        if ctx.expired() {
            // The dispatcher dropped the job at its deadline.
            return crate::score::deadline_exceeded();
        }
        ApiError::new(
            Code::WorkerCrashed,
            "the preprocess worker died while decoding this video; it has been restarted, retry the request",
        )
    })?;
    frames.sort_by(|a, b| a.0.total_cmp(&b.0));
    let spec = &core.cfg.models[model as usize];
    let labels = &spec.output.labels;
    t.decode_ms = d.decode_us as f64 / 1e3;
    t.total_ms = started.elapsed().as_secs_f64() * 1e3;
    Ok(VideoResponse {
        request_id: ctx.request_id.clone(),
        model: spec.name.clone(),
        media: "video",
        codec: d.codec.clone(),
        width: d.width,
        height: d.height,
        duration: d.duration,
        frames_decoded: d.frames_decoded,
        frames_sampled: d.frames_sampled,
        complete: d.complete,
        truncated: d.truncated,
        aggregate: aggregate(labels, &frames, threshold),
        frames: frames
            .iter()
            .map(|(t, v)| FrameScores {
                t: *t,
                scores: crate::score::labelled(labels, v),
            })
            .collect(),
        timings: t,
        degraded: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sampling_options_resolve_defaults_and_caps() {
        let v = config::VideoLimits::default();
        let (s, th) = sampling_from_query(&q(&[]), &v, 0).unwrap();
        assert_eq!(
            (s.mode, s.keyframes_only, th),
            (SampleMode::Fps(1.0), false, 0.5)
        );
        let (s, _) = sampling_from_query(&q(&[("keyframes", "true")]), &v, 0).unwrap();
        assert_eq!(s.mode, SampleMode::All);
        let (s, _) = sampling_from_query(&q(&[("frames", "8"), ("start", "2")]), &v, 10).unwrap();
        assert_eq!(
            (s.mode, s.start, s.max_frames),
            (SampleMode::Count(8), 2.0, 10)
        );
        let err = |p: &[(&str, &str)]| sampling_from_query(&q(p), &v, 10).unwrap_err().code;
        assert_eq!(err(&[("frames", "11")]), Code::TooManyImages);
        assert_eq!(err(&[("fps", "1"), ("frames", "2")]), Code::BadRequest);
        assert_eq!(err(&[("fps", "0")]), Code::BadRequest);
        assert_eq!(err(&[("fps", "abc")]), Code::BadRequest);
        assert_eq!(err(&[("start", "5"), ("end", "3")]), Code::BadRequest);
        assert_eq!(err(&[("keyframes", "maybe")]), Code::BadRequest);
    }

    #[test]
    fn aggregate_takes_max_mean_and_flagged_times() {
        let labels = vec!["sfw".to_string(), "nsfw".to_string()];
        let frames = vec![
            (0.0, vec![0.9, 0.1]),
            (1.0, vec![0.2, 0.8]),
            (2.0, vec![0.4, 0.6]),
        ];
        let a = aggregate(&labels, &frames, 0.6);
        assert_eq!(a.max["nsfw"].as_f64().unwrap() as f32, 0.8);
        assert!((a.mean["nsfw"].as_f64().unwrap() - 0.5).abs() < 1e-6);
        assert_eq!(a.above["nsfw"], serde_json::json!([1.0, 2.0]));
        assert_eq!(a.above["sfw"], serde_json::json!([0.0]));
    }
}
