// Interop driver: ONE real @verdant-web/store client per Node process,
// controlled over stdin/stdout with JSON lines.
//
//   request:  {"id": 1, "cmd": "put", "args": {...}}
//   response: {"id": 1, "ok": true, "result": ...}
//             {"id": 1, "ok": false, "error": "message", "stack": "..."}
//
// stdout carries ONLY protocol lines; everything else (console.*, client
// logs, wire taps) goes to stderr.
//
// Run:  node --import ./register.mjs driver.mjs ['<config json>']
// With a config argument the client is opened at startup and a line
// {"event": "ready", ...} (or {"event": "init-failed", "error": ...}) is
// printed; otherwise the first command must be `init` with the config as args.
//
// Env:
//   VERDANT_DRIVER_LOG=1   print all client log calls (default: warn/error only)
//   VERDANT_DRIVER_WIRE=1  print every sync frame sent/received (ws + http)
//
// See ../harness.py for the Python side and COMMANDS below for the command set.
import './register.mjs';
import './browser-env.mjs';
import { Buffer, resolveObjectURL } from 'node:buffer';
import { createInterface } from 'node:readline';
import { randomBytes } from 'node:crypto';

// ---------------------------------------------------------------------------
// stdout is reserved for the protocol
const protocolOut = process.stdout;
function emit(obj) {
	protocolOut.write(JSON.stringify(obj) + '\n');
}
function logErr(...parts) {
	const text = parts
		.map((p) => {
			if (typeof p === 'string') return p;
			if (p instanceof Error) return p.stack || String(p);
			try {
				return JSON.stringify(p);
			} catch {
				return String(p);
			}
		})
		.join(' ');
	process.stderr.write(`[driver ${new Date().toISOString()}] ${text}\n`);
}
for (const method of ['log', 'info', 'warn', 'error', 'debug', 'trace']) {
	console[method] = (...args) => logErr(`console.${method}:`, ...args);
}

const VERBOSE = ['1', 'true', 'yes'].includes(
	(process.env.VERDANT_DRIVER_LOG || '').toLowerCase(),
);
const WIRE_PRINT = ['1', 'true', 'yes'].includes(
	(process.env.VERDANT_DRIVER_WIRE || '').toLowerCase(),
);

// ---------------------------------------------------------------------------
// Unhandled errors are recorded (a browser would not crash); tests can read
// them with the `errors` command.
const unhandledErrors = [];
function recordUnhandled(kind, err) {
	const text = err instanceof Error ? err.stack || err.message : String(err);
	unhandledErrors.push({ kind, error: text, at: Date.now() });
	logErr(`UNHANDLED ${kind}:`, text);
}
process.on('unhandledRejection', (err) => recordUnhandled('rejection', err));
process.on('uncaughtException', (err) => recordUnhandled('exception', err));

// ---------------------------------------------------------------------------
// Wire tap: wraps WebSocket and fetch before the store is loaded.
const wire = { capture: false, frames: [], max: 5000 };
function tap(frame) {
	if (WIRE_PRINT) {
		logErr(`[wire ${frame.transport} ${frame.dir}]`, frame.url ?? '', frame.data);
	}
	if (!wire.capture) return;
	wire.frames.push({ ...frame, t: Date.now() });
	if (wire.frames.length > wire.max) wire.frames.splice(0, wire.frames.length - wire.max);
}
function parseMaybeJson(text) {
	try {
		return JSON.parse(text);
	} catch {
		return text;
	}
}
{
	const BaseWebSocket = globalThis.WebSocket;
	class TappedWebSocket extends BaseWebSocket {
		constructor(url, protocols, options) {
			super(url, protocols, options);
			const urlText = String(url);
			tap({ transport: 'ws', dir: 'connect', url: urlText, data: null });
			this.addEventListener('message', (event) => {
				tap({ transport: 'ws', dir: 'in', data: parseMaybeJson(String(event.data)) });
			});
			this.addEventListener('open', () => {
				tap({ transport: 'ws', dir: 'open', data: { protocol: this.protocol } });
			});
			this.addEventListener('close', (event) => {
				tap({ transport: 'ws', dir: 'close', data: { code: event.code, reason: event.reason } });
			});
			this.addEventListener('error', (event) => {
				tap({ transport: 'ws', dir: 'error', data: String(event?.message ?? event?.error ?? 'error') });
			});
		}
		send(data) {
			tap({ transport: 'ws', dir: 'out', data: parseMaybeJson(String(data)) });
			return super.send(data);
		}
	}
	globalThis.WebSocket = TappedWebSocket;

	const baseFetch = globalThis.fetch;
	globalThis.fetch = async function tappedFetch(input, init) {
		const url = typeof input === 'string' ? input : input?.url ?? String(input);
		const method = (init?.method || 'GET').toUpperCase();
		let body = null;
		if (typeof init?.body === 'string') body = parseMaybeJson(init.body);
		else if (init?.body instanceof FormData) body = '<multipart form>';
		tap({ transport: 'http', dir: 'out', url, data: { method, body } });
		try {
			const response = await baseFetch(input, init);
			const clone = response.clone();
			clone
				.text()
				.then((text) =>
					tap({
						transport: 'http',
						dir: 'in',
						url,
						data: { status: response.status, body: parseMaybeJson(text) },
					}),
				)
				.catch(() => {});
			return response;
		} catch (err) {
			tap({ transport: 'http', dir: 'error', url, data: String(err) });
			throw err;
		}
	};
}

// The store must be loaded after browser-env (it reads window.indexedDB at
// module evaluation) and after the loader hook is registered.
const verdant = await import('@verdant-web/store');
const { ClientDescriptor, schema, createMigration } = verdant;

// ---------------------------------------------------------------------------
// Test schema (our own definition, modelled on the shape of Verdant's tests).
function makeSchemas() {
	const randomId = () => Math.random().toString(36).slice(2, 9);
	const itemFields = {
		id: schema.fields.string({ default: randomId }),
		content: schema.fields.string({ default: '' }),
		tags: schema.fields.array({ items: schema.fields.string() }),
		purchased: schema.fields.boolean({ default: false }),
		categoryId: schema.fields.string({ nullable: true }),
		comments: schema.fields.array({
			items: schema.fields.object({
				properties: {
					id: schema.fields.string({ default: randomId }),
					content: schema.fields.string({ default: '' }),
					authorId: schema.fields.string(),
				},
			}),
		}),
		image: schema.fields.file({ nullable: true }),
	};
	const itemIndexes = {
		categoryId: { field: 'categoryId' },
		purchasedYesNo: {
			type: 'string',
			compute: (item) => (item.purchased ? 'yes' : 'no'),
		},
	};
	const categoryCollection = schema.collection({
		name: 'category',
		pluralName: 'categories',
		primaryKey: 'id',
		fields: {
			id: schema.fields.string({ default: randomId }),
			name: schema.fields.string(),
			metadata: schema.fields.object({
				nullable: true,
				properties: { color: schema.fields.string() },
			}),
		},
		indexes: { name: { field: 'name' } },
	});

	const v1 = schema({
		version: 1,
		collections: {
			items: schema.collection({
				name: 'item',
				primaryKey: 'id',
				fields: itemFields,
				indexes: itemIndexes,
			}),
			categories: categoryCollection,
		},
	});
	// v2: items gain `priority` (number, default 0). Used to exercise
	// schema-version handling (clients on different versions).
	const v2 = schema({
		version: 2,
		collections: {
			items: schema.collection({
				name: 'item',
				primaryKey: 'id',
				fields: { ...itemFields, priority: schema.fields.number({ default: 0 }) },
				indexes: itemIndexes,
			}),
			categories: categoryCollection,
		},
	});
	const m1 = createMigration(v1);
	const m2 = createMigration(v1, v2, async ({ migrate }) => {
		await migrate('items', (old) => ({ ...old, priority: 0 }));
	});
	return { 1: { schema: v1, migrations: [m1] }, 2: { schema: v2, migrations: [m1, m2] } };
}
const SCHEMAS = makeSchemas();

// ---------------------------------------------------------------------------
// Client state
let config = null;
let descriptor = null;
let client = null;
let futureSeenCount = 0;
// sync-resps whose presence step has run in this client (see watchPresence)
let presenceSyncCount = 0;

const LEVELS = new Set(['debug', 'info', 'warn', 'error', 'critical']);
function clientLog(...args) {
	const level = typeof args[0] === 'string' && LEVELS.has(args[0]) ? args[0] : 'debug';
	if (VERBOSE || level === 'warn' || level === 'error' || level === 'critical') {
		logErr('[verdant]', ...args);
	}
}

function normalizeConfig(raw) {
	const c = { ...(raw || {}) };
	const out = {
		authEndpoint: c.authEndpoint ?? null,
		token: c.token ?? null,
		namespace:
			c.namespace ?? `interop-${process.pid}-${randomBytes(4).toString('hex')}`,
		transport: c.transport ?? 'realtime',
		automaticTransportSelection: c.automaticTransportSelection ?? false,
		pullInterval: c.pullInterval ?? 300,
		initialPresence: c.initialPresence ?? {},
		defaultProfile: c.defaultProfile ?? {},
		autoStart: c.autoStart ?? true,
		presenceUpdateBatchTimeout: c.presenceUpdateBatchTimeout ?? 50,
		schemaVersion: c.schemaVersion ?? 1,
		sync: c.sync ?? true,
		captureWire: c.captureWire ?? false,
		disableRebasing: c.disableRebasing ?? false,
		// 'fresh' (default) or 'live': see evictFromEntityCache
		readMode: c.readMode ?? 'fresh',
		// Resolve init/reopen only after the first sync-resp was processed.
		// 3.6.3 in pull mode silently never sends a change made while its
		// first sync request is in flight (the op is dropped before
		// _hasSynced and is older than the next sync's `since`).
		waitForSync: c.waitForSync ?? false,
		waitForSyncTimeout: c.waitForSyncTimeout ?? 15000,
	};
	if (!['realtime', 'pull'].includes(out.transport)) {
		throw new Error(`transport must be 'realtime' or 'pull', got ${out.transport}`);
	}
	if (!['fresh', 'live'].includes(out.readMode)) {
		throw new Error(`readMode must be 'fresh' or 'live', got ${out.readMode}`);
	}
	if (!SCHEMAS[out.schemaVersion]) {
		throw new Error(`unknown schemaVersion ${out.schemaVersion}`);
	}
	if (out.sync && !out.authEndpoint && !out.token) {
		throw new Error('config needs authEndpoint or token (or sync: false)');
	}
	return out;
}

async function openClient(cfg, { syncedBefore = null } = {}) {
	const { schema: s, migrations } = SCHEMAS[cfg.schemaVersion];
	wire.capture = !!cfg.captureWire;
	let sync;
	if (cfg.sync) {
		sync = {
			initialPresence: cfg.initialPresence,
			defaultProfile: cfg.defaultProfile,
			initialTransport: cfg.transport,
			automaticTransportSelection: cfg.automaticTransportSelection,
			autoStart: cfg.autoStart,
			pullInterval: cfg.pullInterval,
			presenceUpdateBatchTimeout: cfg.presenceUpdateBatchTimeout,
		};
		if (cfg.token) {
			const token = cfg.token;
			sync.fetchAuth = async () => ({ accessToken: token });
		} else {
			sync.authEndpoint = cfg.authEndpoint;
		}
	}
	descriptor = new ClientDescriptor({
		schema: s,
		migrations,
		namespace: cfg.namespace,
		sync,
		log: clientLog,
		disableRebasing: cfg.disableRebasing,
		// indexedDb: the global fake-indexeddb (in-memory, per process)
		indexedDb: globalThis.indexedDB,
	});
	client = await descriptor.open();
	client.subscribe('futureSeen', () => {
		futureSeenCount++;
	});
	presenceSyncCount = 0;
	if (cfg.sync) watchPresence(client);
	if (cfg.sync && cfg.autoStart && cfg.waitForSync) {
		await waitForInitialSync(client, cfg.waitForSyncTimeout, syncedBefore, {
			presenceSynced: true,
		});
	}
	return client;
}

// The store handles a server message in an async handler and applies its
// presence part last, after the message's storage writes (for a sync-resp:
// its data, the global ack, lastSyncedLogicalTime, then one more read of the
// local replica). Handlers of later messages do not wait for it, and a
// sync-resp's presence step REPLACES the peers with its peerPresence. So a
// presence-changed that arrives just after a sync-resp can be applied first
// and then erased by the older snapshot (seen under CPU load: alice never saw
// bob, who joined 20 ms after her sync-resp). "Synced" therefore includes the
// presence step; this counts the sync-resps whose presence step has run.
// Installed right after descriptor.open(): the Client (and its sync) is built
// synchronously at the end of open(), and no message can be handled before
// network I/O, so none is missed.
function watchPresence(c) {
	const presence = c.sync.presence;
	const key = Object.getOwnPropertySymbols(presence).find(
		(s) => s.description === 'handleMessage',
	);
	if (!key || typeof presence[key] !== 'function') {
		throw new Error('unexpected PresenceManager internals: no [handleMessage] handler');
	}
	const handle = presence[key];
	presence[key] = (localReplicaInfo, message) => {
		const result = handle(localReplicaInfo, message);
		if (message?.type === 'sync-resp') presenceSyncCount++;
		return result;
	};
}

// The first processed sync-resp stores its ackedTimestamp as
// lastSyncedLogicalTime; wait for that to change (or appear) and, with
// presenceSynced, for the presence step of a sync-resp of this client.
async function waitForInitialSync(c, timeoutMs, before, { presenceSynced = false } = {}) {
	if (before === undefined) {
		before = (await c.meta.localReplica.get()).lastSyncedLogicalTime ?? null;
	}
	const deadline = Date.now() + timeoutMs;
	while (Date.now() < deadline) {
		const info = await c.meta.localReplica.get();
		if (
			(info.lastSyncedLogicalTime ?? null) !== before &&
			(!presenceSynced || presenceSyncCount > 0)
		) {
			return;
		}
		await new Promise((r) => setTimeout(r, 10));
	}
	throw new Error(
		`initial sync did not complete within ${timeoutMs} ms (no sync-resp with ackedTimestamp processed` +
			`${presenceSynced ? ', and its presence applied' : ''})`,
	);
}

function requireClient() {
	if (!client) throw new Error('client not initialized (send `init` first)');
	return client;
}
function collectionOf(name) {
	const c = requireClient();
	if (!c.collectionNames.includes(name)) {
		throw new Error(`unknown collection ${JSON.stringify(name)} (have ${c.collectionNames.join(', ')})`);
	}
	return c[name];
}

// ---------------------------------------------------------------------------
// Values: {"$file": {name, type, base64}} anywhere in a value becomes a File.
function decodeValue(value) {
	if (Array.isArray(value)) return value.map(decodeValue);
	if (value && typeof value === 'object') {
		if (Object.keys(value).length === 1 && value.$file) {
			const f = value.$file;
			return new File([Buffer.from(f.base64 ?? '', 'base64')], f.name ?? 'file', {
				type: f.type ?? 'application/octet-stream',
			});
		}
		const out = {};
		for (const [k, v] of Object.entries(value)) out[k] = decodeValue(v);
		return out;
	}
	return value;
}

// JSON-safe snapshot (files become {id, url}; undefined dropped).
function plain(value) {
	return JSON.parse(JSON.stringify(value ?? null));
}

// Reads come in two flavours:
//  - fresh (default): drop the document's in-memory Entity from the client's
//    entity cache first, so it is re-hydrated from the client's local storage
//    (baselines + operation log). This is what the client has persisted and
//    what it shows after a reload.
//  - live: the in-memory Entity as a running app renders it.
// Why: in 3.6.3 the in-memory view can miss remote operations for good.
// Entities subscribe to the store through weak-event's WeakEvent, whose
// invoke() splices dead (GC'd) handlers out of the array it is iterating,
// which skips the next handler. Orphaned Entities (e.g. the duplicate that
// put() creates while hydrating) get collected at GC-dependent times, so a
// live Entity sporadically never sees an incoming op; its persisted state is
// still correct. Fresh reads keep tests about the *server* deterministic.
function evictFromEntityCache(predicate) {
	const cache = requireClient().entities.cache; // private Map<oid, WeakRef<Entity>> in 3.6.3
	if (!(cache instanceof Map)) {
		throw new Error('unexpected EntityStore internals: no entity cache Map');
	}
	for (const oid of [...cache.keys()]) {
		if (predicate(oid)) cache.delete(oid);
	}
}
function useLive(live) {
	return live ?? config?.readMode === 'live';
}
async function getEntity(collection, id, { live } = {}) {
	const query = collectionOf(collection).get(id);
	if (!useLive(live)) {
		const rootOid = `${collection}/${id}`;
		evictFromEntityCache((oid) => oid === rootOid);
	}
	// execute() re-runs the query now instead of returning a cached value
	const entity = await query.execute();
	if (!entity || entity.deleted) return null;
	return entity;
}
async function mustGetEntity(collection, id) {
	// A fresh read can race the client's own local compaction (it moves operations into
	// baselines in separate reads of its store) and briefly see neither: retry a few times
	// before calling the document missing.
	let entity = await getEntity(collection, id);
	for (let attempt = 0; !entity && attempt < 10; attempt++) {
		await new Promise((resolve) => setTimeout(resolve, 20));
		entity = await getEntity(collection, id);
	}
	if (!entity) throw new Error(`${collection}/${id} not found`);
	return entity;
}

function splitPath(path) {
	if (Array.isArray(path)) return path;
	if (typeof path === 'number') return [path];
	return String(path)
		.split('.')
		.filter((p) => p.length)
		.map((p) => (/^\d+$/.test(p) ? Number(p) : p));
}
// Resolve all but the last segment of a path to a (nested) entity.
function navigate(entity, segments) {
	let current = entity;
	for (const seg of segments) {
		if (!current || typeof current.get !== 'function') {
			throw new Error(`cannot navigate into ${JSON.stringify(seg)}`);
		}
		current = current.get(seg);
	}
	if (!current || typeof current.get !== 'function') {
		throw new Error(`path does not lead to an object or list`);
	}
	return current;
}
function parentAndKey(entity, path) {
	const segs = splitPath(path);
	if (!segs.length) throw new Error('empty path');
	return [navigate(entity, segs.slice(0, -1)), segs[segs.length - 1]];
}
function targetList(entity, path) {
	const segs = splitPath(path);
	const list = navigate(entity, segs);
	if (!list.isList) throw new Error(`${segs.join('.')} is not a list`);
	return list;
}

// Generic edit operations, applied synchronously inside one batch.
function applyOp(entity, op) {
	switch (op.op) {
		case 'set': {
			const [parent, key] = parentAndKey(entity, op.path);
			parent.set(key, decodeValue(op.value));
			return;
		}
		case 'delete': {
			// delete an (optional/nullable) field or a list item by index
			const [parent, key] = parentAndKey(entity, op.path);
			parent.delete(key);
			return;
		}
		case 'push':
			targetList(entity, op.path).push(decodeValue(op.value));
			return;
		case 'insert':
			targetList(entity, op.path).insert(op.index, decodeValue(op.value));
			return;
		case 'move':
			targetList(entity, op.path).move(op.from, op.to);
			return;
		case 'add':
			targetList(entity, op.path).add(decodeValue(op.value));
			return;
		case 'removeAll':
			targetList(entity, op.path).removeAll(op.value);
			return;
		case 'removeFirst':
			targetList(entity, op.path).removeFirst(op.value);
			return;
		case 'update': {
			const target = op.path == null ? entity : navigate(entity, splitPath(op.path));
			target.update(decodeValue(op.value), { merge: op.merge ?? true });
			return;
		}
		default:
			throw new Error(`unknown op ${JSON.stringify(op.op)}`);
	}
}

// update args: {collection, id, set?: {path: value}, push?: {path: value},
//   removeAt?: {path: index}, remove?: {path: value}, delete?: [path],
//   ops?: [{op, path, ...}], undoable?: bool}
function opsFromUpdateArgs(args) {
	const ops = [];
	for (const [path, value] of Object.entries(args.set ?? {})) ops.push({ op: 'set', path, value });
	for (const [path, value] of Object.entries(args.push ?? {})) ops.push({ op: 'push', path, value });
	for (const [path, index] of Object.entries(args.removeAt ?? {}))
		ops.push({ op: 'delete', path: [...splitPath(path), index] });
	for (const [path, value] of Object.entries(args.remove ?? {})) ops.push({ op: 'removeAll', path, value });
	for (const path of args.delete ?? []) ops.push({ op: 'delete', path });
	ops.push(...(args.ops ?? []));
	return ops;
}

async function fileInfo(collection, id, field) {
	const entity = await mustGetEntity(collection, id);
	const [parent, key] = parentAndKey(entity, field);
	const file = parent.get(key);
	if (file == null) return null;
	if (!file.isFile) throw new Error(`${field} is not a file field`);
	return {
		id: file.id,
		url: file.url,
		name: file.name,
		type: file.type,
		loading: file.loading,
		failed: file.failed,
		// not part of EntityFile's public getters; read for diagnostics only
		remote: file._fileData ? !!file._fileData.remote : null,
	};
}

async function fileContent(collection, id, field) {
	const info = await fileInfo(collection, id, field);
	if (!info) return null;
	if (info.loading || !info.url) throw new Error(`file not available yet: ${JSON.stringify(info)}`);
	let bytes;
	if (info.url.startsWith('blob:')) {
		const blob = resolveObjectURL(info.url);
		if (!blob) throw new Error(`cannot resolve ${info.url}`);
		bytes = Buffer.from(await blob.arrayBuffer());
	} else {
		const res = await fetch(info.url);
		if (!res.ok) throw new Error(`GET ${info.url} -> ${res.status}`);
		bytes = Buffer.from(await res.arrayBuffer());
	}
	return { ...info, base64: bytes.toString('base64'), size: bytes.length };
}

async function statusOf() {
	const c = requireClient();
	const replica = await c.meta.localReplica.get();
	const ack = await c.meta.ackInfo.getAckInfo();
	return {
		isConnected: c.sync.isConnected,
		mode: c.sync.mode,
		status: c.sync.status,
		pullInterval: c.sync.pullInterval,
		syncing: c.sync.syncing ?? false,
		replicaId: replica.id,
		ackedLogicalTime: replica.ackedLogicalTime ?? null,
		lastSyncedLogicalTime: replica.lastSyncedLogicalTime ?? null,
		globalAckTimestamp: ack?.globalAckTimestamp ?? null,
		namespace: c.namespace,
		schemaVersion: c.schema.version,
		futureSeen: futureSeenCount,
		unhandledErrors: unhandledErrors.length,
	};
}

// ---------------------------------------------------------------------------
const COMMANDS = {
	async init(args) {
		if (client) throw new Error('already initialized');
		config = normalizeConfig(args);
		await openClient(config);
		return statusOf();
	},
	async ping() {
		return { pong: true, pid: process.pid, initialized: !!client };
	},
	// put {collection, doc, undoable?} -> id
	async put({ collection, doc, undoable }) {
		const entity = await collectionOf(collection).put(decodeValue(doc ?? {}), {
			undoable: undoable ?? true,
		});
		const pk = requireClient().schema.collections[collection].primaryKey;
		return entity.get(pk);
	},
	async update(args) {
		const entity = await mustGetEntity(args.collection, args.id);
		const ops = opsFromUpdateArgs(args);
		if (!ops.length) throw new Error('update: nothing to do');
		await requireClient()
			.batch({ undoable: args.undoable ?? true })
			.run(() => {
				for (const op of ops) applyOp(entity, op);
			})
			.commit();
		return entity.getSnapshot() ? plain(entity.getSnapshot()) : null;
	},
	// delete {collection, id}
	async delete({ collection, id, undoable }) {
		await collectionOf(collection).delete(id, { undoable: undoable ?? true });
		return null;
	},
	// get {collection, id, live?}
	async get({ collection, id, live }) {
		const entity = await getEntity(collection, id, { live });
		return entity ? plain(entity.getSnapshot()) : null;
	},
	// list {collection, live?}
	async list({ collection, live }) {
		const queries = collectionOf(collection);
		if (!useLive(live)) {
			const prefix = `${collection}/`;
			evictFromEntityCache((oid) => oid.startsWith(prefix));
		}
		const entities = await queries.findAll().execute();
		const pk = requireClient().schema.collections[collection].primaryKey;
		return entities
			.filter((e) => e && !e.deleted)
			.map((e) => plain(e.getSnapshot()))
			.sort((a, b) => (a[pk] < b[pk] ? -1 : a[pk] > b[pk] ? 1 : 0));
	},
	async presenceUpdate({ presence }) {
		await requireClient().sync.presence.update(presence);
		return plain(requireClient().sync.presence.self);
	},
	async presence() {
		const p = requireClient().sync.presence;
		return {
			self: plain(p.self),
			peers: plain(p.peers),
			peerIds: [...p.peerIds],
			selfReplicaIds: [...p.selfReplicaIds],
		};
	},
	async syncStart() {
		requireClient().sync.start();
		return statusOf();
	},
	async syncStop() {
		requireClient().sync.stop();
		return statusOf();
	},
	async reconnect() {
		requireClient().sync.reconnect();
		return statusOf();
	},
	async setMode({ mode }) {
		requireClient().sync.setMode(mode);
		return statusOf();
	},
	async setPullInterval({ interval }) {
		requireClient().sync.setPullInterval(interval);
		return statusOf();
	},
	// waitForSync {timeoutMs?}: wait until lastSyncedLogicalTime changes
	// (a new sync-resp or server-ack was processed)
	async waitForSync({ timeoutMs } = {}) {
		await waitForInitialSync(requireClient(), timeoutMs ?? 15000, undefined);
		return statusOf();
	},
	async syncOnce() {
		await requireClient().sync.syncOnce();
		return statusOf();
	},
	async status() {
		return statusOf();
	},
	// attachFile {collection, id, field, name, type, base64}
	async attachFile({ collection, id, field, name, type, base64 }) {
		const entity = await mustGetEntity(collection, id);
		const file = new File([Buffer.from(base64 ?? '', 'base64')], name ?? 'file', {
			type: type ?? 'application/octet-stream',
		});
		await requireClient()
			.batch({ undoable: false })
			.run(() => {
				const [parent, key] = parentAndKey(entity, field);
				parent.set(key, file);
			})
			.commit();
		return fileInfo(collection, id, field);
	},
	async fileInfo({ collection, id, field }) {
		return fileInfo(collection, id, field);
	},
	async fileContent({ collection, id, field }) {
		return fileContent(collection, id, field);
	},
	async stats() {
		const c = requireClient();
		const s = await c.stats();
		const counts = {};
		for (const [name, v] of Object.entries(s.collections ?? {})) counts[name] = v.count;
		return {
			collections: counts,
			operations: s.meta?.operationsSize?.count ?? null,
			baselines: s.meta?.baselinesSize?.count ?? null,
			raw: plain({ collections: s.collections, meta: s.meta }),
		};
	},
	async undo() {
		const did = await requireClient().undoHistory.undo();
		return !!did;
	},
	async redo() {
		const did = await requireClient().undoHistory.redo();
		return !!did;
	},
	// wire {clear?} -> captured frames (needs captureWire: true in config)
	async wire({ clear } = {}) {
		const frames = wire.frames.slice();
		if (clear) wire.frames.length = 0;
		return frames;
	},
	async errors() {
		return unhandledErrors.slice();
	},
	// reopen: close the client and open it again on the same in-memory
	// IndexedDB (simulates an app restart with persisted local data).
	async reopen(overrides) {
		const c = requireClient();
		const syncedBefore = (await c.meta.localReplica.get()).lastSyncedLogicalTime ?? null;
		await c.close();
		client = null;
		config = normalizeConfig({ ...config, ...(overrides || {}) });
		await openClient(config, { syncedBefore });
		return statusOf();
	},
	async close() {
		if (client) {
			await client.close();
			client = null;
		}
		closing = true;
		return null;
	},
};

// ---------------------------------------------------------------------------
let closing = false;
let chain = Promise.resolve();

async function handleLine(line) {
	if (!line.trim()) return;
	let msg;
	try {
		msg = JSON.parse(line);
	} catch (err) {
		emit({ id: null, ok: false, error: `invalid JSON: ${err.message}` });
		return;
	}
	const { id = null, cmd, args } = msg;
	const fn = Object.prototype.hasOwnProperty.call(COMMANDS, cmd) ? COMMANDS[cmd] : null;
	if (!fn) {
		emit({ id, ok: false, error: `unknown command ${JSON.stringify(cmd)}` });
		return;
	}
	try {
		const result = await fn(args ?? {});
		emit({ id, ok: true, result: result === undefined ? null : result });
	} catch (err) {
		logErr(`command ${cmd} failed:`, err);
		emit({
			id,
			ok: false,
			error: err instanceof Error ? `${err.name}: ${err.message}` : String(err),
			stack: err instanceof Error ? err.stack : undefined,
		});
	}
	if (closing) {
		process.stdout.write('', () => process.exit(0));
	}
}

// Config given on the command line: open right away.
if (process.argv[2]) {
	chain = chain.then(async () => {
		try {
			const result = await COMMANDS.init(JSON.parse(process.argv[2]));
			emit({ event: 'ready', result });
		} catch (err) {
			logErr('init failed:', err);
			emit({ event: 'init-failed', error: String(err?.message ?? err) });
		}
	});
}

const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
// Commands run strictly one after another, in arrival order.
rl.on('line', (line) => {
	chain = chain.then(() => handleLine(line));
});
rl.on('close', () => {
	// stdin closed (parent went away): shut down cleanly.
	chain = chain.then(async () => {
		if (client && !closing) {
			try {
				await client.close();
			} catch (err) {
				logErr('close on EOF failed:', err);
			}
		}
		process.exit(0);
	});
});
