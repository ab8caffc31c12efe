-- wrk script: rotate GET requests over the conversation paths of one fill,
-- each with `Authorization: Bearer <token>`, and print a machine-readable
-- summary line ("BENCH_JSON {...}") when the run ends.
--
-- Environment: BENCH_PATHS = file with one request path per line,
--              BENCH_TOKEN = the bearer token.
-- Every request string is built once at start-up, so wrk spends its CPU on
-- sockets, not on Lua string building.

local token = os.getenv("BENCH_TOKEN") or ""
local paths_file = os.getenv("BENCH_PATHS") or "paths.txt"

local requests_ = {}
local next_index = 1

local function load_requests()
  local headers = { ["Authorization"] = "Bearer " .. token }
  for line in io.lines(paths_file) do
    if line ~= "" then
      requests_[#requests_ + 1] = wrk.format("GET", line, headers)
    end
  end
  if #requests_ == 0 then
    error("no paths in " .. paths_file)
  end
end

load_requests()

local thread_count = 0
function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_id", thread_count)
end

function init(args)
  -- Threads start at different offsets so they do not ask for the same
  -- conversation in lock-step.
  local tid = thread_id or 1
  next_index = ((tid - 1) * 53) % #requests_ + 1
end

function request()
  local req = requests_[next_index]
  next_index = next_index % #requests_ + 1
  return req
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d},' ..
    '"paths":%d}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.max, latency.stdev,
    latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0), latency:percentile(99.9),
    #requests_))
end
