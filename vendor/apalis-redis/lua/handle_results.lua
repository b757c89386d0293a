-- KEYS[1] =  the worker inflight_set
-- KEYS[2] = done_jobs_set
-- KEYS[3] = dead_jobs_set
-- KEYS[4] = scheduled_jobs_set
-- KEYS[5] = job_meta_hash
-- KEYS[6] = job_data_hash
-- ARGV[1] = emit events
-- ARGV[2..] = repeating groups of: task_id, timestamp, result_data, status, attempt
--
-- callcoach patch (see vendor/README.md): a finished task's data and metadata are deleted
-- instead of being kept forever in the done/dead sets (the application's ledger holds the
-- outcome), and a failed task is retried only while attempt < its stored max_attempts
-- (upstream hard-codes 25).
local inflight_set = KEYS[1]
local done_jobs_set = KEYS[2]
local dead_jobs_set = KEYS[3]
local scheduled_jobs_set = KEYS[4]
local job_meta_hash = KEYS[5]
local job_data_hash = KEYS[6]
local emit_events = ARGV[1] == "1"

local args_per_task = 5
local num_tasks = (#ARGV - 1) / args_per_task
local acked = 0

for i = 0, num_tasks - 1 do
    local base = (i * args_per_task + 1)
    local task_id = ARGV[base + 1]
    local timestamp = ARGV[base + 2]
    local result_data = ARGV[base + 3]
    local status = ARGV[base + 4]
    local attempt = tonumber(ARGV[base + 5]) or 0

    local removed = redis.call('SREM', inflight_set, task_id)
    if removed == 0 then
        error("task not executed by worker")
    end

    local meta_key = job_meta_hash .. ':' .. task_id
    local max_attempts = tonumber(redis.call('HGET', meta_key, 'max_attempts')) or 25

    if (status == 'Failed' or status == 'Pending') and attempt < max_attempts then
        redis.call("zadd", scheduled_jobs_set, tonumber(timestamp) + attempt, task_id)
        redis.call('HSET', meta_key, 'result', result_data, 'status', status, 'attempts', attempt)
        if emit_events then
            redis.call("publish", "tasks:" .. scheduled_jobs_set .. ':retry', task_id)
        end
    else
        redis.call('HDEL', job_data_hash, task_id)
        redis.call('DEL', meta_key)
        if emit_events then
            local set = status == 'Done' and done_jobs_set or dead_jobs_set
            redis.call("publish", "tasks:" .. set, task_id)
        end
    end

    acked = acked + 1
end

return acked
