-- wrk script: PUT with a 128-byte body and the fencing token from the
-- FENCING_TOKEN environment variable (sent to every contender, so every
-- one receives the same bytes; only fencegate checks it).
wrk.method = "PUT"
wrk.body = string.rep("x", 128)
wrk.headers["Content-Type"] = "application/octet-stream"
local token = os.getenv("FENCING_TOKEN")
if token ~= nil and token ~= "" then
    wrk.headers["Fencing-Token"] = token
end
