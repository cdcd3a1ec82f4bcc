"""Prometheus metrics of one hub process (a registry per app, so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class HubMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter("ehi_hub_messages_total", "MQTT messages received", ["channel"],
                                registry=r)
        self.bad_messages = Counter("ehi_hub_bad_messages_total",
                                    "Messages refused (malformed, unknown version, wrong device)",
                                    ["reason"], registry=r)
        # Every message refused at the boundary or by the database, by channel and reason
        # (reasons: fleet.contract.errors.ProtocolError.reason, and "store" for one the
        # database refused alone, "internal" for an unexpected failure while decoding it).
        self.refused = Counter("ehi_hub_refused_messages_total",
                               "Messages refused, by channel and reason", ["channel", "reason"],
                               registry=r)
        self.worker_errors = Counter("ehi_hub_worker_errors_total",
                                     "Steps of a hub worker that raised (the worker goes on)",
                                     ["worker"], registry=r)
        self.worker_up = Gauge("ehi_hub_worker_up", "1 while a hub worker runs and makes "
                               "progress, 0 when it has ended or stalled (set when /readyz or "
                               "/metrics is read)", ["worker"], registry=r)
        self.results_inserted = Counter("ehi_hub_results_inserted_total",
                                        "Result records stored", registry=r)
        self.results_duplicate = Counter("ehi_hub_results_duplicate_total",
                                         "Result records received again and not stored twice",
                                         registry=r)
        self.results_rejected = Counter("ehi_hub_results_rejected_total",
                                        "Result records refused as invalid", registry=r)
        self.offloads = Counter("ehi_hub_offloads_answered_total", "Offloads answered",
                                ["outcome"], registry=r)
        self.batch_size = Histogram("ehi_hub_batch_size", "Offloads per cloud inference batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.infer_seconds = Histogram("ehi_hub_infer_seconds", "Cloud model time per batch",
                                       buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1),
                                       registry=r)
        self.queue_depth = Gauge("ehi_hub_queue_depth", "Messages waiting for a worker", ["queue"],
                                 registry=r)
        self.hard_examples = Counter("ehi_hub_hard_examples_total",
                                     "Hard examples answered late: stored, duplicate, rejected",
                                     ["outcome"], registry=r)
        # From each device's telemetry: what its outbox holds and has lost.
        self.device_outbox = Gauge("ehi_device_outbox", "A device's outbox, from its telemetry: "
                                   "entries waiting, dropped_full, dropped_expired",
                                   ["device", "figure"], registry=r)
        # From each device's telemetry: its offload controller and its model's fidelity.
        self.device_offload = Gauge(
            "ehi_device_offload", "A device's offloading, from its telemetry: target (share of "
            "inputs), recent_rate (its last 100 inputs), threshold, drift (log2 of the target "
            "over the calibration share its threshold offloads; |drift| >= 1 is drift)",
            ["device", "figure"], registry=r)
        self.device_drifting = Gauge("ehi_device_offload_drifting",
                                     "1 while a device's offload controller reports drift",
                                     ["device"], registry=r)
        self.device_fidelity = Gauge(
            "ehi_device_fidelity_agreement", "Top-1 agreement of a device's model with its "
            "bundle's reference on the fidelity set, on the serving backend",
            ["device", "backend"], registry=r)
        self.update_reports = Counter("ehi_hub_update_reports_total",
                                      "Devices' model-update reports, by state", ["state"],
                                      registry=r)
        self.uploads = Counter("ehi_hub_model_uploads_total",
                               "Bundle uploads: accepted, or refused with a reason", ["outcome"],
                               registry=r)
        self.broker_deaf = Counter("ehi_hub_broker_deaf_total",
                                   "Times the hub heard nothing from the broker, not even its "
                                   "own heartbeat, for too long, and reconnected", registry=r)
        self.broker_silence = Gauge("ehi_hub_broker_silence_seconds",
                                    "Seconds since the hub last received a message", registry=r)
        self.rate_limited = Counter("ehi_hub_api_rate_limited_total",
                                    "API requests refused with 429", registry=r)
        self.api_limited = Counter("ehi_hub_api_limited_total",
                                   "API requests refused with 429, by the limit that refused "
                                   "them: address, refused (attempts), caller", ["limit"],
                                   registry=r)
        # Which replica these figures are of (Prometheus adds `instance`; this names the
        # replica as the hub does, for joins and dashboards).
        self.replica = Gauge("ehi_hub_replica_info", "This hub replica", ["replica"],
                             registry=r)
        self.devices = Gauge("ehi_hub_devices", "Devices the hub knows, online or not (counted "
                             "in the database when scraped)", ["state"], registry=r)
        self.store_errors = Counter("ehi_hub_store_errors_total", "Database operations failed",
                                    registry=r)
        # Rollouts (cloud_hub/rollouts.py): set by the replica that holds the controller's lease.
        self.rollouts = Gauge("ehi_hub_rollouts", "Rollouts by state", ["state"], registry=r)
        self.rollout_leader = Gauge("ehi_hub_rollout_leader",
                                    "1 while this replica runs the rollouts", registry=r)
        self.rollout_assignments = Counter(
            "ehi_hub_rollout_assignments_total",
            "Devices assigned by the rollout controller: the new version, or back after a halt",
            ["kind"], registry=r)
        self.rollout_stages = Counter(
            "ehi_hub_rollout_stages_total",
            "Stages judged: passed, or halted with the gate that failed", ["decision", "gate"],
            registry=r)
        self.rollout_actions = Counter("ehi_hub_rollout_actions_total",
                                       "Operator actions on rollouts, done or refused",
                                       ["action", "outcome"], registry=r)
