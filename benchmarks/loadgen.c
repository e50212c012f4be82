/*
 * loadgen: a small epoll load generator for uppercase line servers, loopback only.
 *
 *   loadgen tcp   --port P [--conns N] [--size S] [--duration D] [--max-requests M]
 *   loadgen burst --port P [--conns N] [--size S] [--timeout T]
 *   loadgen idle  --port P [--conns N] [--size S] [--timeout T]
 *   loadgen udp   --port P [--conns N] [--sockets K] [--size S] [--duration D]
 *   common: [--host 127.0.0.1|::1] [--cpu-pid PID] [--framing line|u32]
 *
 * Every request is S bytes: lowercase letters then '\n' (with --framing u32: a 4-byte
 * big-endian length S-4, then S-4 lowercase letters); every reply must be the
 * uppercase of its request, or it counts as an error.  Each mode prints one line of
 * JSON on stdout.  tcp: N connections in closed loop (one request in flight each).
 * burst: N connects at the same instant, one line each, time until all replies.
 * idle: connect N, print a line, wait for a line on stdin, then one request on each.
 * udp: N datagrams in flight over K sockets, lost ones resent after 200 ms.
 * With --cpu-pid the server's CPU time (utime+stime of all its threads, from
 * /proc/PID/stat) over the measured window is reported as server_cpu_s.
 * Every loop is bounded by a deadline and a count; only 127.0.0.1 and ::1 are accepted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZE (1 << 20)
#define MAX_CONNS 100000
#define CONNECT_WINDOW 64     /* tcp/idle: connects in flight at once */
#define CONNECT_RETRIES 50    /* per connection, on refusal */
#define UDP_RESEND_NS 200000000LL
#define MAX_EVENTS 256

/* ---- options ---------------------------------------------------------------- */

static struct {
    const char *mode;
    const char *host;
    const char *framing;
    int port, conns, size, sockets, cpu_pid;
    double duration, timeout;
    long long max_requests;
} opt = {NULL, "127.0.0.1", "line", 0, 1, 64, 4, 0, 5.0, 5.0, 50000000LL};

static struct sockaddr_storage addr;
static socklen_t addrlen;

static void die(const char *what)
{
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void usage(const char *msg)
{
    fprintf(stderr, "loadgen: %s\nusage: loadgen tcp|burst|idle|udp --port P [--host 127.0.0.1|::1]"
                    " [--conns N] [--size S] [--sockets K] [--duration D] [--timeout T]"
                    " [--max-requests M] [--cpu-pid PID] [--framing line|u32]\n", msg);
    exit(2);
}

static void parse_args(int argc, char **argv)
{
    if (argc < 2)
        usage("missing mode");
    opt.mode = argv[1];
    for (int i = 2; i < argc; i += 2) {
        if (i + 1 >= argc)
            usage("option without a value");
        const char *k = argv[i], *v = argv[i + 1];
        if (!strcmp(k, "--host")) opt.host = v;
        else if (!strcmp(k, "--port")) opt.port = atoi(v);
        else if (!strcmp(k, "--conns")) opt.conns = atoi(v);
        else if (!strcmp(k, "--size")) opt.size = atoi(v);
        else if (!strcmp(k, "--sockets")) opt.sockets = atoi(v);
        else if (!strcmp(k, "--duration")) opt.duration = atof(v);
        else if (!strcmp(k, "--timeout")) opt.timeout = atof(v);
        else if (!strcmp(k, "--max-requests")) opt.max_requests = atoll(v);
        else if (!strcmp(k, "--cpu-pid")) opt.cpu_pid = atoi(v);
        else if (!strcmp(k, "--framing")) opt.framing = v;
        else usage("unknown option");
    }
    if (opt.port <= 0 || opt.port > 65535) usage("--port must be 1..65535");
    if (opt.conns < 1 || opt.conns > MAX_CONNS) usage("--conns must be 1..100000");
    if (opt.size < 2 || opt.size > MAX_SIZE) usage("--size must be 2..1048576");
    if (strcmp(opt.framing, "line") && strcmp(opt.framing, "u32")) usage("--framing must be line or u32");
    if (opt.framing[0] == 'u' && opt.size < 5) usage("--size must be at least 5 with --framing u32");
    if (opt.sockets < 1 || opt.sockets > opt.conns) opt.sockets = opt.conns < 4 ? opt.conns : 4;
    if (opt.duration <= 0 || opt.duration > 3600) usage("--duration must be in (0, 3600]");
    if (opt.timeout <= 0 || opt.timeout > 3600) usage("--timeout must be in (0, 3600]");
    if (opt.max_requests < 1) usage("--max-requests must be positive");

    /* Network safety: the loopback host only, never anything else. */
    memset(&addr, 0, sizeof addr);
    if (!strcmp(opt.host, "127.0.0.1")) {
        struct sockaddr_in *a = (struct sockaddr_in *)&addr;
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)opt.port);
        inet_pton(AF_INET, opt.host, &a->sin_addr);
        addrlen = sizeof *a;
    } else if (!strcmp(opt.host, "::1")) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)&addr;
        a->sin6_family = AF_INET6;
        a->sin6_port = htons((uint16_t)opt.port);
        inet_pton(AF_INET6, opt.host, &a->sin6_addr);
        addrlen = sizeof *a;
    } else {
        usage("refusing a host other than 127.0.0.1 or ::1");
    }
}

/* ---- clocks and CPU ----------------------------------------------------------- */

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double self_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* utime+stime of a whole process (all threads) in seconds, or -1. */
static double proc_cpu_s(int pid)
{
    char path[64], buf[2048];
    if (pid <= 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    /* The command name may hold spaces: fields are counted after its closing ')'. */
    char *p = strrchr(buf, ')');
    unsigned long long utime = 0, stime = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu",
                     &utime, &stime) != 2)
        return -1;
    return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

/* ---- latency histogram: 32 sub-buckets per power of two of nanoseconds (~3%) ---- */

#define SUB 32
#define NBUCKETS (64 * SUB)
static unsigned long long hist[NBUCKETS];
static unsigned long long hist_count;

static int bucket_of(long long ns)
{
    if (ns < SUB)
        return (int)(ns < 0 ? 0 : ns);
    int exp = 63 - __builtin_clzll((unsigned long long)ns);   /* >= 5 */
    int sub = (int)((ns >> (exp - 5)) & (SUB - 1));
    return (exp - 4) * SUB + sub;
}

static double bucket_upper_us(int b)
{
    if (b < SUB)
        return (b + 1) / 1000.0;
    int exp = b / SUB + 4, sub = b % SUB;
    return (double)((long long)(SUB + sub + 1) << (exp - 5)) / 1000.0;
}

static void record(long long ns)
{
    hist[bucket_of(ns)]++;
    hist_count++;
}

static double percentile_us(double q)
{
    if (hist_count == 0)
        return 0;
    unsigned long long want = (unsigned long long)(q * (double)hist_count);
    if (want >= hist_count)
        want = hist_count - 1;
    unsigned long long seen = 0;
    for (int b = 0; b < NBUCKETS; b++) {
        seen += hist[b];
        if (seen > want)
            return bucket_upper_us(b);
    }
    return 0;
}

/* ---- payloads ----------------------------------------------------------------- */

/* Fill buf with S-1 lowercase letters varying with seq, then '\n'; or, with
 * --framing u32, a 4-byte big-endian length S-4, then S-4 lowercase letters. */
static void make_request(char *buf, int size, unsigned long long seq)
{
    if (opt.framing[0] == 'u') {
        uint32_t n = (uint32_t)(size - 4);
        buf[0] = (char)(n >> 24), buf[1] = (char)(n >> 16), buf[2] = (char)(n >> 8);
        buf[3] = (char)n;
        for (int i = 4; i < size; i++)
            buf[i] = (char)('a' + (seq + (unsigned)i) % 26);
        return;
    }
    for (int i = 0; i < size - 1; i++)
        buf[i] = (char)('a' + (seq + (unsigned)i) % 26);
    buf[size - 1] = '\n';
}

static int is_upper_of(const char *reply, const char *req, int size)
{
    for (int i = 0; i < size; i++) {
        char want = (req[i] >= 'a' && req[i] <= 'z') ? (char)(req[i] - 32) : req[i];
        if (reply[i] != want)
            return 0;
    }
    return 1;
}

/* ---- TCP connections ---------------------------------------------------------- */

enum { C_NEW, C_CONNECTING, C_READY, C_SENDING, C_WAITING, C_DONE, C_FAILED };

struct conn {
    int fd, state, retries;
    int sent, got;
    long long start_ns, done;
    long long last_ns, max_gap_ns;  /* tcp: longest stretch of the window without an answer */
    unsigned long long seq;
    char *req, *rep;
};

static struct conn *conns;
static int epfd;
static long long n_errors, n_refused, n_reset, n_timeout;

static void raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void alloc_conns(int n, int size)
{
    conns = calloc((size_t)n, sizeof *conns);
    if (!conns)
        die("calloc");
    for (int i = 0; i < n; i++) {
        conns[i].fd = -1;
        conns[i].req = malloc((size_t)size);
        conns[i].rep = malloc((size_t)size);
        if (!conns[i].req || !conns[i].rep)
            die("malloc");
    }
}

static void ep_set(int fd, uint32_t events, int idx, int op)
{
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)idx};
    if (epoll_ctl(epfd, op, fd, &ev) < 0)
        die("epoll_ctl");
}

/* Start a non-blocking connect; 0 when started (or done), -1 on immediate failure. */
static int start_connect(int i)
{
    struct conn *c = &conns[i];
    c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        die("socket (is RLIMIT_NOFILE high enough?)");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&addr, addrlen) < 0 && errno != EINPROGRESS) {
        int err = errno;
        close(c->fd);
        c->fd = -1;
        errno = err;
        return -1;
    }
    c->state = C_CONNECTING;
    ep_set(c->fd, EPOLLOUT, i, EPOLL_CTL_ADD);
    return 0;
}

/* A connecting socket became writable: 1 connected, 0 retry later, -1 failed. */
static int finish_connect(int i)
{
    struct conn *c = &conns[i];
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err == 0) {
        c->state = C_READY;
        ep_set(c->fd, EPOLLIN, i, EPOLL_CTL_MOD);
        return 1;
    }
    close(c->fd);
    c->fd = -1;
    c->state = C_NEW;
    if ((err == ECONNREFUSED || err == EAGAIN) && ++c->retries <= CONNECT_RETRIES)
        return 0;
    if (err == ECONNREFUSED) n_refused++;
    else if (err == ECONNRESET) n_reset++;
    else n_errors++;
    c->state = C_FAILED;
    return -1;
}

/*
 * Connect all N with at most `window` connects in flight (window >= N: all at once).
 * Returns the number connected; bounded by the deadline and CONNECT_RETRIES.
 */
static int connect_all(int n, int window, long long deadline)
{
    int next = 0, inflight = 0, connected = 0, failed = 0;
    struct epoll_event evs[MAX_EVENTS];
    while (connected + failed < n && now_ns() < deadline) {
        while (next < n && inflight < window) {
            if (conns[next].state == C_NEW) {
                if (start_connect(next) == 0) {
                    inflight++;
                } else if ((errno == EAGAIN || errno == ECONNREFUSED) &&
                           ++conns[next].retries <= CONNECT_RETRIES) {
                    break;     /* try this one again after the next wait */
                } else {
                    conns[next].state = C_FAILED;
                    n_errors++;
                    failed++;
                }
            }
            next++;
        }
        int k = epoll_wait(epfd, evs, MAX_EVENTS, 10);
        if (k < 0 && errno != EINTR)
            die("epoll_wait");
        for (int e = 0; e < k; e++) {
            int i = (int)evs[e].data.u32;
            if (conns[i].state != C_CONNECTING)
                continue;      /* an already connected one: the peer closed or sent */
            int r = finish_connect(i);
            inflight--;
            if (r > 0) {
                connected++;
            } else if (r < 0) {
                failed++;
            } else if (i < next) {
                next = i;      /* refused: retry it (and rescan from there) */
            }
        }
    }
    return connected;
}

/* Try to send the rest of c's request; 0 ok (maybe partial), -1 error. */
static int pump_send(int i)
{
    struct conn *c = &conns[i];
    while (c->sent < opt.size) {
        ssize_t w = send(c->fd, c->req + c->sent, (size_t)(opt.size - c->sent), MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) {
                if (c->state != C_SENDING)
                    ep_set(c->fd, EPOLLIN | EPOLLOUT, i, EPOLL_CTL_MOD);
                c->state = C_SENDING;
                return 0;
            }
            return -1;
        }
        c->sent += (int)w;
    }
    if (c->state == C_SENDING)
        ep_set(c->fd, EPOLLIN, i, EPOLL_CTL_MOD);
    c->state = C_WAITING;
    return 0;
}

static int send_request(int i, unsigned long long seq)
{
    struct conn *c = &conns[i];
    c->seq = seq;
    make_request(c->req, opt.size, seq);
    c->sent = c->got = 0;
    c->start_ns = now_ns();
    return pump_send(i);
}

/* Read what is there; 1 when the whole reply arrived, 0 not yet, -1 error/EOF. */
static int pump_recv(int i)
{
    struct conn *c = &conns[i];
    while (c->got < opt.size) {
        ssize_t r = recv(c->fd, c->rep + c->got, (size_t)(opt.size - c->got), 0);
        if (r == 0) {
            errno = ECONNRESET;
            return -1;
        }
        if (r < 0)
            return errno == EAGAIN ? 0 : -1;
        c->got += (int)r;
    }
    return 1;
}

static void fail_conn(int i)
{
    struct conn *c = &conns[i];
    if (errno == ECONNRESET || errno == EPIPE) n_reset++;
    else if (errno == ECONNREFUSED) n_refused++;
    else n_errors++;
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->state = C_FAILED;
}

static void print_common(long long connected, double connect_s)
{
    printf("\"connected\": %lld, \"connect_s\": %.6f, \"errors\": %lld, \"refused\": %lld, "
           "\"resets\": %lld, \"timeouts\": %lld",
           connected, connect_s, n_errors, n_refused, n_reset, n_timeout);
}

static void print_latency(void)
{
    printf(", \"p50_us\": %.1f, \"p99_us\": %.1f, \"p999_us\": %.1f, \"max_us\": %.1f",
           percentile_us(0.5), percentile_us(0.99), percentile_us(0.999), percentile_us(1.0));
}

/* tcp: N connections in closed loop for --duration seconds. */
static int run_tcp(void)
{
    alloc_conns(opt.conns, opt.size);
    long long t0 = now_ns();
    int connected = connect_all(opt.conns, CONNECT_WINDOW, t0 + (long long)(30 * 1e9));
    double connect_s = (double)(now_ns() - t0) / 1e9;

    long long requests = 0, mismatches = 0;
    unsigned long long seq = 0;
    double cpu0 = self_cpu_s(), srv0 = proc_cpu_s(opt.cpu_pid);
    long long start = now_ns(), deadline = start + (long long)(opt.duration * 1e9);
    for (int i = 0; i < opt.conns; i++) {
        conns[i].last_ns = start;
        if (conns[i].state == C_READY && send_request(i, seq++) < 0)
            fail_conn(i);
    }

    struct epoll_event evs[MAX_EVENTS];
    long long now = start;
    while (now < deadline && requests < opt.max_requests) {
        int k = epoll_wait(epfd, evs, MAX_EVENTS, 50);
        if (k < 0 && errno != EINTR)
            die("epoll_wait");
        now = now_ns();
        for (int e = 0; e < k; e++) {
            int i = (int)evs[e].data.u32;
            struct conn *c = &conns[i];
            if (c->state == C_FAILED)
                continue;
            if (c->state == C_SENDING && (evs[e].events & EPOLLOUT) && pump_send(i) < 0) {
                fail_conn(i);
                continue;
            }
            if (!(evs[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                continue;
            int r = pump_recv(i);
            if (r < 0) {
                fail_conn(i);
            } else if (r > 0) {
                record(now - c->start_ns);
                requests++;
                c->done++;
                if (now - c->last_ns > c->max_gap_ns)
                    c->max_gap_ns = now - c->last_ns;
                c->last_ns = now;
                if (!is_upper_of(c->rep, c->req, opt.size))
                    mismatches++;
                if (now < deadline && send_request(i, seq++) < 0)
                    fail_conn(i);
            }
        }
    }
    double secs = (double)(now_ns() - start) / 1e9;
    double cpu = self_cpu_s() - cpu0, srv1 = proc_cpu_s(opt.cpu_pid);
    /* starved: open, but never answered; stalled: open, and some stretch of the window
     * of more than a second went without an answer (the end of the window included). */
    long long alive = 0, starved = 0, stalled = 0, max_gap = 0, end = start + (long long)(secs * 1e9);
    for (int i = 0; i < opt.conns; i++) {
        struct conn *c = &conns[i];
        if (c->state == C_FAILED || c->state == C_NEW)
            continue;
        long long gap = end - c->last_ns > c->max_gap_ns ? end - c->last_ns : c->max_gap_ns;
        alive++;
        starved += c->done == 0;
        stalled += gap > 1000000000LL;
        if (gap > max_gap)
            max_gap = gap;
    }
    n_errors += mismatches;
    printf("{\"mode\": \"tcp\", \"conns\": %d, \"size\": %d, \"requests\": %lld, "
           "\"seconds\": %.6f, \"rps\": %.1f, \"mismatches\": %lld, \"alive\": %lld, "
           "\"starved\": %lld, \"stalled_1s\": %lld, \"max_gap_us\": %.1f, ", opt.conns, opt.size,
           requests, secs, (double)requests / secs, mismatches, alive, starved, stalled,
           (double)max_gap / 1e3);
    print_common(connected, connect_s);
    print_latency();
    printf(", \"loadgen_cpu_s\": %.6f, \"server_cpu_s\": %.6f}\n", cpu,
           srv0 >= 0 && srv1 >= 0 ? srv1 - srv0 : -1.0);
    return 0;
}

/*
 * burst: all N connects issued at once, a line sent on each as soon as it connects;
 * the time until every reply arrived.  Refusals and resets are failures (no retry);
 * whatever is not answered by --timeout counts as a timeout.
 */
static int run_burst(void)
{
    alloc_conns(opt.conns, opt.size);
    long long start = now_ns(), deadline = start + (long long)(opt.timeout * 1e9);
    long long connected = 0, served = 0, mismatches = 0, last_ns = start;
    double srv0 = proc_cpu_s(opt.cpu_pid);
    for (int i = 0; i < opt.conns; i++) {
        conns[i].start_ns = start;
        if (start_connect(i) < 0)
            fail_conn(i);
    }
    struct epoll_event evs[MAX_EVENTS];
    long long done = n_errors + n_refused + n_reset;
    while (done < opt.conns) {
        long long now = now_ns();
        if (now >= deadline)
            break;
        int k = epoll_wait(epfd, evs, MAX_EVENTS, 10);
        if (k < 0 && errno != EINTR)
            die("epoll_wait");
        now = now_ns();
        for (int e = 0; e < k; e++) {
            int i = (int)evs[e].data.u32;
            struct conn *c = &conns[i];
            if (c->state == C_CONNECTING) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    errno = err;
                    fail_conn(i);
                    done++;
                    continue;
                }
                connected++;
                c->state = C_READY;
                ep_set(c->fd, EPOLLIN, i, EPOLL_CTL_MOD);
                make_request(c->req, opt.size, (unsigned long long)i);
                if (pump_send(i) < 0) {
                    fail_conn(i);
                    done++;
                }
                continue;
            }
            if (c->state == C_SENDING && (evs[e].events & EPOLLOUT) && pump_send(i) < 0) {
                fail_conn(i);
                done++;
                continue;
            }
            if (c->state == C_DONE || c->state == C_FAILED ||
                !(evs[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                continue;
            int r = pump_recv(i);
            if (r < 0) {
                fail_conn(i);
                done++;
            } else if (r > 0) {
                record(now - start);
                served++;
                done++;
                last_ns = now;
                if (!is_upper_of(c->rep, c->req, opt.size))
                    mismatches++;
                c->state = C_DONE;
                close(c->fd);
                c->fd = -1;
            }
        }
    }
    n_timeout = opt.conns - done;
    n_errors += mismatches;
    double srv1 = proc_cpu_s(opt.cpu_pid);
    double all_s = served == opt.conns ? (double)(last_ns - start) / 1e9 : -1.0;
    printf("{\"mode\": \"burst\", \"conns\": %d, \"size\": %d, \"served\": %lld, "
           "\"all_served_s\": %.6f, \"last_reply_s\": %.6f, \"mismatches\": %lld, ",
           opt.conns, opt.size, served, all_s, (double)(last_ns - start) / 1e9, mismatches);
    print_common(connected, (double)(now_ns() - start) / 1e9);
    print_latency();
    printf(", \"server_cpu_s\": %.6f}\n", srv0 >= 0 && srv1 >= 0 ? srv1 - srv0 : -1.0);
    return 0;
}

/*
 * idle: connect N and hold them; print a progress line; wait (bounded) for any line
 * on stdin; then send one request on every connection and wait for all replies.
 */
static int run_idle(void)
{
    alloc_conns(opt.conns, opt.size);
    long long t0 = now_ns();
    int connected = connect_all(opt.conns, CONNECT_WINDOW, t0 + (long long)(20 * 1e9));
    printf("{\"mode\": \"idle\", \"phase\": \"connected\", \"connected\": %d, "
           "\"connect_s\": %.6f}\n", connected, (double)(now_ns() - t0) / 1e9);
    fflush(stdout);

    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    char line[64];
    if (poll(&pfd, 1, 300000) <= 0 || read(0, line, sizeof line) <= 0)
        fprintf(stderr, "loadgen: no go-ahead on stdin; pinging now\n");

    long long start = now_ns(), deadline = start + (long long)(opt.timeout * 1e9);
    long long served = 0, mismatches = 0, pending = 0;
    for (int i = 0; i < opt.conns; i++) {
        if (conns[i].state != C_READY)
            continue;
        if (send_request(i, (unsigned long long)i) < 0)
            fail_conn(i);
        else
            pending++;
    }
    struct epoll_event evs[MAX_EVENTS];
    while (pending > 0 && now_ns() < deadline) {
        int k = epoll_wait(epfd, evs, MAX_EVENTS, 10);
        if (k < 0 && errno != EINTR)
            die("epoll_wait");
        long long now = now_ns();
        for (int e = 0; e < k; e++) {
            int i = (int)evs[e].data.u32;
            struct conn *c = &conns[i];
            if (c->state == C_FAILED || c->state == C_DONE)
                continue;
            if (c->state == C_SENDING && (evs[e].events & EPOLLOUT) && pump_send(i) < 0) {
                fail_conn(i);
                pending--;
                continue;
            }
            if (!(evs[e].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                continue;
            int r = pump_recv(i);
            if (r < 0) {
                fail_conn(i);
                pending--;
            } else if (r > 0) {
                record(now - c->start_ns);
                served++;
                pending--;
                if (!is_upper_of(c->rep, c->req, opt.size))
                    mismatches++;
                c->state = C_DONE;
            }
        }
    }
    n_timeout = pending;
    n_errors += mismatches;
    printf("{\"mode\": \"idle\", \"phase\": \"done\", \"conns\": %d, \"served\": %lld, "
           "\"seconds\": %.6f, \"mismatches\": %lld, ", opt.conns, served,
           (double)(now_ns() - start) / 1e9, mismatches);
    print_common(connected, (double)(now_ns() - t0) / 1e9);
    print_latency();
    printf("}\n");
    return 0;
}

/* ---- UDP ---------------------------------------------------------------------- */

/*
 * udp: --conns datagrams in flight, spread over --sockets sockets.  Each datagram
 * starts with its slot number and generation spelled in letters a..p (so the reply,
 * uppercased, names them); a slot not answered in 200 ms is counted lost and resent
 * with the next generation, and late replies to an old generation are ignored.
 */
struct slot {
    int sock;
    unsigned gen;
    long long sent_ns;
};

static void encode(char *buf, int size, unsigned slot, unsigned gen)
{
    make_request(buf, size, gen);
    for (int i = 0; i < 4 && i < size - 1; i++)
        buf[i] = (char)('a' + ((slot >> (4 * i)) & 15));
    for (int i = 0; i < 8 && 4 + i < size - 1; i++)
        buf[4 + i] = (char)('a' + ((gen >> (4 * i)) & 15));
}

static int decode(const char *buf, int len, unsigned *slot, unsigned *gen)
{
    if (len < 13)
        return -1;
    *slot = *gen = 0;
    for (int i = 0; i < 12; i++) {
        int d = buf[i] - 'A';
        if (d < 0 || d > 15)
            return -1;
        if (i < 4) *slot |= (unsigned)d << (4 * i);
        else *gen |= (unsigned)d << (4 * (i - 4));
    }
    return 0;
}

static int run_udp(void)
{
    if (opt.size < 14) usage("udp needs --size >= 14");
    if (opt.size > 65000) usage("udp needs --size <= 65000");
    int nsock = opt.sockets, *socks = calloc((size_t)nsock, sizeof *socks);
    struct slot *slots = calloc((size_t)opt.conns, sizeof *slots);
    char *req = malloc((size_t)opt.size), *rep = malloc((size_t)opt.size + 1);
    if (!socks || !slots || !req || !rep)
        die("malloc");
    for (int s = 0; s < nsock; s++) {
        socks[s] = socket(addr.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (socks[s] < 0)
            die("socket");
        if (connect(socks[s], (struct sockaddr *)&addr, addrlen) < 0)
            die("connect");
        ep_set(socks[s], EPOLLIN, s, EPOLL_CTL_ADD);
    }
    long long requests = 0, lost = 0, mismatches = 0, late = 0, send_errors = 0;
    double cpu0 = self_cpu_s(), srv0 = proc_cpu_s(opt.cpu_pid);
    long long start = now_ns(), deadline = start + (long long)(opt.duration * 1e9);
    for (int i = 0; i < opt.conns; i++) {
        slots[i].sock = socks[i % nsock];
        encode(req, opt.size, (unsigned)i, 0);
        slots[i].sent_ns = now_ns();
        if (send(slots[i].sock, req, (size_t)opt.size, 0) < 0)
            send_errors++;       /* the resend timer retries it */
    }
    struct epoll_event evs[MAX_EVENTS];
    long long now = start, next_scan = start + 10000000LL;
    while (now < deadline && requests < opt.max_requests) {
        int k = epoll_wait(epfd, evs, MAX_EVENTS, 10);
        if (k < 0 && errno != EINTR)
            die("epoll_wait");
        now = now_ns();
        for (int e = 0; e < k; e++) {
            int fd = socks[evs[e].data.u32];
            for (int burst = 0; burst < 64; burst++) {
                ssize_t r = recv(fd, rep, (size_t)opt.size + 1, 0);
                if (r < 0)
                    break;   /* EAGAIN, or ECONNREFUSED from an ICMP error: resend handles it */
                unsigned slot, gen;
                if (decode(rep, (int)r, &slot, &gen) < 0 || slot >= (unsigned)opt.conns) {
                    mismatches++;
                    continue;
                }
                struct slot *sl = &slots[slot];
                if (gen != sl->gen) {
                    late++;
                    continue;
                }
                encode(req, opt.size, slot, gen);
                if (r != opt.size || !is_upper_of(rep, req, opt.size))
                    mismatches++;
                record(now - sl->sent_ns);
                requests++;
                sl->gen++;
                encode(req, opt.size, slot, sl->gen);
                sl->sent_ns = now;
                if (send(sl->sock, req, (size_t)opt.size, 0) < 0)
                    send_errors++;
            }
        }
        if (now >= next_scan) {   /* resend what has waited 200 ms */
            next_scan = now + 10000000LL;
            for (int i = 0; i < opt.conns; i++) {
                if (now - slots[i].sent_ns < UDP_RESEND_NS)
                    continue;
                lost++;
                slots[i].gen++;
                encode(req, opt.size, (unsigned)i, slots[i].gen);
                slots[i].sent_ns = now;
                if (send(slots[i].sock, req, (size_t)opt.size, 0) < 0)
                    send_errors++;
            }
        }
    }
    double secs = (double)(now_ns() - start) / 1e9;
    double cpu = self_cpu_s() - cpu0, srv1 = proc_cpu_s(opt.cpu_pid);
    n_timeout = lost;
    n_errors = mismatches;
    printf("{\"mode\": \"udp\", \"conns\": %d, \"sockets\": %d, \"size\": %d, "
           "\"requests\": %lld, \"seconds\": %.6f, \"rps\": %.1f, \"lost\": %lld, "
           "\"late\": %lld, \"send_errors\": %lld, \"mismatches\": %lld, ",
           opt.conns, nsock, opt.size, requests, secs, (double)requests / secs, lost, late,
           send_errors, mismatches);
    print_common(nsock, 0.0);
    print_latency();
    printf(", \"loadgen_cpu_s\": %.6f, \"server_cpu_s\": %.6f}\n", cpu,
           srv0 >= 0 && srv1 >= 0 ? srv1 - srv0 : -1.0);
    return 0;
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    raise_nofile();
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    if (!strcmp(opt.mode, "tcp")) return run_tcp();
    if (!strcmp(opt.mode, "burst")) return run_burst();
    if (!strcmp(opt.mode, "idle")) return run_idle();
    if (!strcmp(opt.mode, "udp")) return run_udp();
    usage("mode must be tcp, burst, idle or udp");
    return 2;
}
