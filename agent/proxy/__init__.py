"""The local loopback proxy: per-service listeners that forward to endpoints the agent picks.

    tcp    a pick per connection, held for its life; bytes moved by the listener's relay,
           bulk spliced in the kernel (tcp.py, relay.py)
    http   HTTP/1.1, a pick per request over pooled keep-alive upstreams (http1.py; plain
           heads taken without llhttp by heads.py)
    http2  h2c, a pick per stream over pooled upstream HTTP/2 connections (http2.py, on the
           core's sans-I/O H2Connection; h2headers.py checks client header blocks)

listener.py runs one listener (accept, cap, drain, the sweep of deadlines; fds.py keeps
proxy connections out of the agent's fd reserve); manager.py
keeps the set in step with reloads; picks.py is the one place that talks
to the core; figures.py keeps the per-listener and per-endpoint counters. docs/PROXY.md.
"""
