// The Prisma query engine that LiteLLM's proxy talks to, served from Prisma's own WebAssembly
// build of that engine (the same engine commit its Python client expects) on PostgreSQL.
//
// Why this exists: LiteLLM keeps virtual keys in PostgreSQL through Prisma Client Python, which
// starts a native `query-engine` binary and speaks Prisma's GraphQL protocol to it over HTTP.
// That binary is only published on Prisma's own download host, which these machines cannot
// reach; the npm registry carries the engine as WebAssembly (`@prisma/query-engine-wasm`),
// which reaches PostgreSQL through the `pg` driver adapter and speaks only the JSON protocol.
// This process is the binary's stand-in: the same HTTP routes (`/status`, `POST /`,
// `/transaction/*`), each GraphQL request turned into the equivalent JSON-protocol request,
// and each answer turned back into the shape the Python client reads.
//
// Started by Prisma Client Python as `<engine> -p PORT ...`, with PRISMA_DML_PATH (the schema)
// and DATABASE_URL or OVERWRITE_DATASOURCES in its environment; TOKENMART_ENGINE_MODULES names
// the node_modules folder holding the engine, the adapter and `pg`.

import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';

const MODULES = process.env.TOKENMART_ENGINE_MODULES;
const require = createRequire(path.join(MODULES, 'noop.js'));
const ENGINE_DIR = path.join(MODULES, '@prisma/query-engine-wasm/postgresql');

// Longest first: an action is the prefix of the GraphQL field, the model name the rest.
const ACTIONS = [
  'findUniqueOrThrow', 'findFirstOrThrow', 'createManyAndReturn', 'findUnique', 'findFirst', 'findMany',
  'createOne', 'createMany', 'updateOne', 'updateMany', 'deleteOne', 'deleteMany', 'upsertOne',
  'aggregate', 'groupBy', 'queryRaw', 'executeRaw',
];

/** An enum member (`desc`, `created_at` in `by: [...]`): sent as its name, never tagged as a
 * field value, unlike a string literal. */
class EnumName {
  constructor(name) {
    this.name = name;
  }

  toJSON() {
    return this.name;
  }
}

/** Splits a GraphQL document (the subset Prisma Client Python writes) into tokens. */
function tokenize(text) {
  const tokens = [];
  const pattern = /\s+|,|([{}()[\]:])|("(?:[^"\\]|\\.)*")|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|([A-Za-z_][A-Za-z0-9_]*)/gy;
  let match;
  while (pattern.lastIndex < text.length) {
    const at = pattern.lastIndex;
    match = pattern.exec(text);
    if (!match || match.index !== at) throw new Error(`unexpected GraphQL at ${at}: ${text.slice(at, at + 40)}`);
    if (match[1]) tokens.push({ kind: 'punct', value: match[1] });
    else if (match[2]) tokens.push({ kind: 'string', value: JSON.parse(match[2]) });
    else if (match[3]) tokens.push({ kind: 'number', value: match[3] });
    else if (match[4]) tokens.push({ kind: 'name', value: match[4] });
  }
  return tokens;
}

/** A recursive-descent reader over the tokens: values, arguments and selection sets. */
class Reader {
  constructor(text) {
    this.tokens = tokenize(text);
    this.at = 0;
  }

  peek(value) {
    const token = this.tokens[this.at];
    return token !== undefined && token.kind === 'punct' && token.value === value;
  }

  next() {
    const token = this.tokens[this.at++];
    if (token === undefined) throw new Error('GraphQL ended early');
    return token;
  }

  expect(value) {
    const token = this.next();
    if (token.value !== value) throw new Error(`expected ${value}, got ${token.value}`);
  }

  value() {
    const token = this.next();
    if (token.kind === 'string') return token.value;
    if (token.kind === 'number') return numberValue(token.value);
    if (token.kind === 'name') {
      if (token.value === 'true') return true;
      if (token.value === 'false') return false;
      if (token.value === 'null') return null;
      return new EnumName(token.value); // the JSON protocol takes an enum member's name as a string
    }
    if (token.value === '[') {
      const items = [];
      while (!this.peek(']')) items.push(this.value());
      this.expect(']');
      return items;
    }
    if (token.value === '{') {
      const object = {};
      while (!this.peek('}')) {
        const key = this.next().value;
        this.expect(':');
        object[key] = this.value();
      }
      this.expect('}');
      return object;
    }
    throw new Error(`unexpected ${token.value} in a value`);
  }

  arguments() {
    const args = {};
    if (!this.peek('(')) return args;
    this.expect('(');
    while (!this.peek(')')) {
      const key = this.next().value;
      this.expect(':');
      args[key] = this.value();
    }
    this.expect(')');
    return args;
  }

  /** `{ a b { c } d(take: 1) { e } }` -> the JSON protocol's selection object. */
  selection() {
    const selection = {};
    if (!this.peek('{')) return selection;
    this.expect('{');
    while (!this.peek('}')) {
      const field = this.field();
      const nested = Object.keys(field.args).length > 0 || field.selection !== null;
      selection[field.name] = nested ? { arguments: field.args, selection: field.selection ?? {} } : true;
    }
    this.expect('}');
    return selection;
  }

  field() {
    let name = this.next().value;
    if (this.peek(':')) {
      this.expect(':');
      name = this.next().value; // `result: findManyX`: the alias is always `result`
    }
    const args = this.arguments();
    const selection = this.peek('{') ? this.selection() : null;
    return { name, args, selection };
  }
}

/** Integers past 2^53 keep their digits as a tagged BigInt instead of losing them to a double. */
function numberValue(text) {
  const number = Number(text);
  if (Number.isSafeInteger(number) || !/^-?\d+$/.test(text)) return number;
  return { $type: 'BigInt', value: text };
}

/** Each model's fields and their types, read from the schema: the JSON protocol needs Json and
 * DateTime inputs tagged, where GraphQL sent both as plain strings. */
function fieldTypes(datamodel) {
  const models = {};
  let fields = null;
  for (const line of datamodel.split('\n')) {
    const opening = line.match(/^model\s+(\w+)\s*\{/);
    if (opening) fields = models[opening[1]] = {};
    else if (/^\}/.test(line)) fields = null;
    else if (fields) {
      const field = line.match(/^\s*(\w+)\s+(\w+)/);
      if (field) fields[field[1]] = field[2];
    }
  }
  return models;
}

const TAGGED = new Set(['Json', 'DateTime']);
// Arguments whose strings name fields (`orderBy: {created_at: "desc"}`), not field values.
const FIELD_NAMES = new Set(['orderBy', 'by', 'distinct', 'having']);

/** Tags the string values of a model's Json and DateTime fields, walking into wrappers (`data`,
 * `where`, `create`, `set`, lists) with the same model and into relation fields with theirs. */
function tagInputs(value, model, models) {
  if (Array.isArray(value)) return value.map((item) => tagInputs(item, model, models));
  if (value === null || typeof value !== 'object' || value instanceof EnumName) return value;
  const fields = models[model] ?? {};
  return Object.fromEntries(
    Object.entries(value).map(([key, item]) => {
      if (FIELD_NAMES.has(key)) return [key, item];
      const type = fields[key];
      if (TAGGED.has(type)) return [key, tagScalar(item, type)];
      return [key, tagInputs(item, type in models ? type : model, models)];
    }),
  );
}

function tagScalar(value, type) {
  if (typeof value === 'string') return { $type: type, value };
  if (Array.isArray(value)) return value.map((item) => tagScalar(item, type));
  if (value === null || typeof value !== 'object' || value instanceof EnumName) return value;
  return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, tagScalar(item, type)]));
}

/** One GraphQL operation (`query { result: findManyX(...) { ... } }`) as a JSON-protocol query. */
function toJsonQuery(graphql, models) {
  const reader = new Reader(graphql);
  reader.next(); // `query` or `mutation`
  reader.expect('{');
  const field = reader.field();
  const action = ACTIONS.find((name) => field.name.startsWith(name));
  if (action === undefined) throw new Error(`unknown Prisma action in ${field.name}`);
  const model = field.name.slice(action.length);
  const query = { arguments: model ? tagInputs(field.args, model, models) : field.args, selection: field.selection ?? {} };
  return model ? { modelName: model, action, query } : { action, query };
}

/** Tagged output values (`{"$type": "DateTime", "value": ...}`) back to the plain values of the
 * GraphQL protocol. */
function untag(value) {
  if (Array.isArray(value)) return value.map(untag);
  if (value === null || typeof value !== 'object') return value;
  if ('$type' in value && 'value' in value && Object.keys(value).length === 2) return untag(value.value);
  return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, untag(item)]));
}

/** Raw-query JSON columns parsed, as the native engine returns them (the `pg` adapter hands
 * them over as JSON text). */
function parseJsonColumns(raw) {
  const parse = (value) => (typeof value === 'string' ? JSON.parse(value) : value);
  const columns = raw.types.map((type) => (type === 'json' ? parse : type === 'json-array' ? (v) => v?.map(parse) : null));
  raw.rows = raw.rows.map((row) => row.map((value, i) => (columns[i] && value !== null ? columns[i](value) : value)));
  return raw;
}

/** The engine's answer to one query as the GraphQL protocol's `{"data": {"result": ...}}`. */
function toGraphqlAnswer(answer) {
  if (answer.errors) return answer;
  const [[name, value]] = Object.entries(answer.data ?? { result: null });
  const result = untag(value);
  return { data: { result: name === 'queryRaw' && result?.rows ? parseJsonColumns(result) : result } };
}

async function loadEngine() {
  const bindings = await import(pathToFileURL(path.join(ENGINE_DIR, 'query_engine_bg.js')).href);
  const bytes = fs.readFileSync(path.join(ENGINE_DIR, 'query_engine_bg.wasm'));
  const { instance } = await WebAssembly.instantiate(bytes, { './query_engine_bg.js': bindings });
  bindings.__wbg_set_wasm(instance.exports);
  return bindings;
}

/** The datasource URL Prisma Client Python hands its engine, and the pool size in it. */
function datasource() {
  const overrides = process.env.OVERWRITE_DATASOURCES ? JSON.parse(process.env.OVERWRITE_DATASOURCES) : [];
  const url = new URL(overrides[0]?.url ?? process.env.DATABASE_URL);
  const limit = Number(url.searchParams.get('connection_limit') ?? 10);
  for (const key of [...url.searchParams.keys()]) {
    if (key !== 'sslmode') url.searchParams.delete(key); // Prisma's own options, not libpq's
  }
  return { connectionString: url.toString(), max: limit };
}

/** `query-engine <commit>`, which the Python client compares with the commit it was built for. */
function printVersion() {
  const manifest = JSON.parse(fs.readFileSync(path.join(MODULES, '@prisma/query-engine-wasm/package.json'), 'utf8'));
  process.stdout.write(`query-engine ${manifest.version.split('.').pop()}\n`);
}

async function main() {
  if (process.argv.includes('--version')) {
    printVersion();
    return;
  }
  const portIndex = process.argv.findIndex((arg) => arg === '-p' || arg === '--port');
  const port = Number(process.argv[portIndex + 1]);
  const { Pool } = require('pg');
  const { PrismaPg } = require('@prisma/adapter-pg');
  const { bindAdapter } = require('@prisma/driver-adapter-utils');
  const { QueryEngine } = await loadEngine();
  const datamodel = fs.readFileSync(process.env.PRISMA_DML_PATH, 'utf8');
  const models = fieldTypes(datamodel);
  const adapter = bindAdapter(new PrismaPg(new Pool(datasource())));
  const logs = (line) => {
    if (process.env.LOG_QUERIES) process.stderr.write(`${line}\n`);
  };
  const engine = new QueryEngine({ datamodel, logLevel: 'error', logQueries: false }, logs, adapter);
  await engine.connect('{}');

  const routes = {
    'GET /status': async () => ({ status: 'ok' }),
    'GET /metrics': async () => ({ counters: [], gauges: [], histograms: [] }),
    'POST /': async (body, txId) => {
      const request = JSON.parse(body);
      if (request.batch) {
        const batch = { batch: request.batch.map((item) => toJsonQuery(item.query, models)), transaction: {} };
        const answer = JSON.parse(await engine.query(JSON.stringify(batch), '{}', txId));
        if (answer.errors) return answer;
        return { batchResult: answer.batchResult.map(toGraphqlAnswer) };
      }
      const answer = JSON.parse(await engine.query(JSON.stringify(toJsonQuery(request.query, models)), '{}', txId));
      return toGraphqlAnswer(answer);
    },
    'POST /transaction/start': async (body) => JSON.parse(await engine.startTransaction(body, '{}')),
  };

  const server = http.createServer((request, response) => {
    const chunks = [];
    request.on('data', (chunk) => chunks.push(chunk));
    request.on('end', async () => {
      const url = request.url.split('?')[0];
      const tx = url.match(/^\/transaction\/([^/]+)\/(commit|rollback)$/);
      let route = routes[`${request.method} ${url}`];
      if (tx) {
        route = async () => {
          const call = tx[2] === 'commit' ? engine.commitTransaction : engine.rollbackTransaction;
          return JSON.parse(await call.call(engine, tx[1], '{}'));
        };
      }
      if (route === undefined) {
        response.writeHead(404).end();
        return;
      }
      try {
        const answer = await route(Buffer.concat(chunks).toString(), request.headers['x-transaction-id']);
        const status = answer && answer.error_code ? 400 : 200;
        response.writeHead(status, { 'content-type': 'application/json' }).end(JSON.stringify(answer));
      } catch (error) {
        const answer = { errors: [{ error: String(error), user_facing_error: { is_panic: false, message: String(error) } }] };
        response.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(answer));
      }
    });
  });
  server.keepAliveTimeout = 60_000;
  server.listen(port, '127.0.0.1');
  const stop = () => server.close(() => engine.disconnect('{}').finally(() => process.exit(0)));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main().catch((error) => {
  process.stderr.write(`query engine failed to start: ${error.stack ?? error}\n`);
  process.exit(1);
});
