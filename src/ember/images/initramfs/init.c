/*
 * ember-init: PID 1 of every Ember guest, in a few KiB of freestanding C.
 *
 * Why C and no libc: under kvm_pvm every instruction the guest kernel runs
 * is emulated, so unpacking a big initramfs and every fork+exec of a shell
 * cost seconds (shared/HOST.md).  This program needs neither.
 *
 * Two modes, chosen by the kernel command line (read from /proc/cmdline):
 *   no ember.root=      the test mode: print "EMBER-USERSPACE-OK <release>"
 *                       and reset the VM;
 *   ember.root=/dev/X   mount X read-only under a tmpfs-backed overlay (and
 *                       a tmpfs on /tmp),
 *                       switch into it, run the workload in ember.cmd= (base64
 *                       of its NUL-separated argv), then reset the VM with the
 *                       restart command "ember-exit=<status>", which the
 *                       kernel prints and the VMM reads back.
 * In the second mode it also brings up lo and, given ember.net=ADDR/PREFIX[,GW],
 * gives eth0 that address and a default route: a few ioctls here instead of
 * iproute2 (not in the root file system) or the kernel's ip= autoconfig.  The
 * gateway is also the guest's DNS server (/etc/resolv.conf): Ember's host
 * serves each networked sandbox a resolver there (src/ember/network/resolver.py).
 */
typedef unsigned long size_t;
typedef long ssize_t;

#define SYS_ioctl 16
#define SYS_socket 41
#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_dup2 33
#define SYS_fork 57
#define SYS_execve 59
#define SYS_exit 60
#define SYS_wait4 61
#define SYS_kill 62
#define SYS_chdir 80
#define SYS_mkdir 83
#define SYS_unlink 87
#define SYS_chroot 161
#define SYS_sync 162
#define SYS_mount 165
#define SYS_umount2 166
#define SYS_reboot 169
#define SYS_setsid 112

#define O_RDONLY 0
#define O_WRONLY 1
#define O_RDWR 2
#define O_CREAT 0100
#define O_TRUNC 01000
#define O_NOFOLLOW 0400000
#define MS_RDONLY 1
#define MS_NOSUID 2
#define MS_NODEV 4
#define MS_NOEXEC 8
#define MS_MOVE 8192
#define SIGKILL 9
#define ECHILD 10
#define LINUX_REBOOT_MAGIC1 0xfee1deadL
#define LINUX_REBOOT_MAGIC2 672274793L
#define LINUX_REBOOT_CMD_RESTART2 0xA1B2C3D4L

#define AF_INET 2
#define SOCK_DGRAM 2
#define SIOCADDRT 0x890B
#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define SIOCSIFADDR 0x8916
#define SIOCSIFNETMASK 0x891C
#define IFF_UP 1
#define RTF_UP 1
#define RTF_GATEWAY 2

#define CMDLINE_MAX 4096
#define ARGS_MAX 3072
#define ARGV_MAX 256

static long sys6(long n, long a, long b, long c, long d, long e)
{
	long ret;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return ret;
}
#define sys3(n, a, b, c) sys6((n), (long)(a), (long)(b), (long)(c), 0, 0)

static size_t len(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

static void say(const char *s)
{
	sys3(SYS_write, 2, s, len(s));
}

static void put_num(long v)
{
	char buf[24];
	int i = sizeof(buf);
	int neg = v < 0;
	if (neg)
		v = -v;
	buf[--i] = 0;
	do {
		buf[--i] = '0' + v % 10;
		v /= 10;
	} while (v);
	if (neg)
		buf[--i] = '-';
	say(buf + i);
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

static void end(long status)
{
	char cmd[32] = "ember-exit=";
	char *p = cmd + 11;
	char digits[12];
	int n = 0;
	if (status < 0 || status > 255)
		status = 255;
	do {
		digits[n++] = '0' + status % 10;
		status /= 10;
	} while (status);
	while (n)
		*p++ = digits[--n];
	*p = 0;
	sys3(SYS_sync, 0, 0, 0);
	sys6(SYS_reboot, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_RESTART2,
	     (long)cmd, 0);
	for (;;)
		sys3(SYS_exit, 1, 0, 0);
}

static void must(long ret, const char *what)
{
	if (ret < 0) {
		say("ember-init: ");
		say(what);
		say(" failed: errno ");
		put_num(-ret);
		say("\n");
		end(125);
	}
}

/* Copy the value of key (e.g. "ember.root=") from the command line into out. */
static int param(const char *cmdline, const char *key, char *out, size_t size)
{
	const char *p = cmdline;
	while (*p) {
		while (*p == ' ' || *p == '\n')
			p++;
		if (starts_with(p, key)) {
			size_t i = 0;
			p += len(key);
			while (*p && *p != ' ' && *p != '\n' && i + 1 < size)
				out[i++] = *p++;
			out[i] = 0;
			return 1;
		}
		while (*p && *p != ' ' && *p != '\n')
			p++;
	}
	return 0;
}

static int b64(char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+' || c == '-')
		return 62;
	if (c == '/' || c == '_')
		return 63;
	return -1;
}

/* Decode base64 in place; returns the decoded length. */
static size_t unbase64(char *s)
{
	size_t out = 0;
	unsigned int acc = 0;
	int bits = 0;
	for (char *p = s; *p; p++) {
		int v = b64(*p);
		if (v < 0)
			continue;
		acc = (acc << 6) | (unsigned int)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			s[out++] = (char)(acc >> bits);
		}
	}
	s[out] = 0; /* terminates the last argument; out < strlen(s) */
	return out;
}

static void test_mode(void)
{
	static const char marker[] = "EMBER-USERSPACE-OK ";
	char release[128];
	long n = 0;
	long fd = sys3(SYS_open, "/proc/sys/kernel/osrelease", O_RDONLY, 0);
	if (fd >= 0)
		n = sys3(SYS_read, fd, release, sizeof(release) - 1);
	if (n <= 0) {
		release[0] = '?';
		release[1] = '\n';
		n = 2;
	}
	sys3(SYS_write, 1, marker, sizeof(marker) - 1);
	sys3(SYS_write, 1, release, n);
	end(0);
}

static char *envp[] = {
	"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
	"HOME=/root",
	"TERM=linux",
	"LANG=C.UTF-8",
	0, /* the SSE-only variables below, given ember.simd=sse */
	0,
	0,
	0,
};
#define ENVP_BASE 4

/*
 * ember.simd=sse: the guest kernel does not save the AVX registers (it runs
 * without XSAVE: kvm_pvm cannot execute xrstor), yet user code runs natively
 * and, on a host whose CPUID user code reads directly (AMD here), sees AVX,
 * AVX2 and AVX-512.  Two processes that both use them corrupt each other's
 * registers at every switch (seen: random SIGSEGV and SIGBUS in python3, whose
 * glibc copies strings with AVX-512).  These variables, inherited by the
 * agent and everything it starts, keep glibc, numpy and OpenBLAS on SSE.
 * ember.agent.execute passes them (ember.agent.simd.SIMD_ENV) on to every
 * command.  The same emulated kernel makes every page fault cost ~2 ms, so
 * glibc's malloc also asks for transparent huge pages (glibc.malloc.hugetlb=1:
 * MADV_HUGEPAGE on its mmap-ed blocks and its heap; THP is in madvise mode):
 * bytearray(64 MiB) in a fresh python3 took 41 s in 4 KiB faults, 2 s so.
 */
static char *const sse_only[] = {
	"GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,"
	"-AVX512CD,-FMA,-FMA4,-F16C,-AVX_Fast_Unaligned_Load:glibc.malloc.hugetlb=1",
	"NPY_DISABLE_CPU_FEATURES=AVX,F16C,FMA3,AVX2,AVX512F,AVX512CD,AVX512_KNL,AVX512_KNM,"
	"AVX512_SKX,AVX512_CLX,AVX512_CNL,AVX512_ICL,AVX512_SPR",
	"OPENBLAS_CORETYPE=Nehalem",
	0,
};

static void use_sse_only(void)
{
	for (int i = 0; sse_only[i]; i++)
		envp[ENVP_BASE + i] = sse_only[i];
}

/*
 * A tmpfs whose files keep each whole 2 MiB of their length in one huge page
 * (huge=within_size): one page allocation and one page-cache entry instead of
 * 512, which is what a file's bytes cost the emulated kernel beyond their copy
 * (10 MiB written in 3.5 s instead of 5.0 s, read in 2.25 s instead of 2.85 s).
 * Only a file's length decides, so small files keep small pages; the agent gives
 * an upload its length before its bytes. A kernel without transparent huge
 * pages refuses the option: then a plain tmpfs.
 */
static long mount_tmpfs(const char *target, long flags, const char *huge, const char *plain)
{
	long ret = sys6(SYS_mount, (long)"tmpfs", (long)target, (long)"tmpfs", flags, (long)huge);
	if (ret < 0)
		ret = sys6(SYS_mount, (long)"tmpfs", (long)target, (long)"tmpfs", flags, (long)plain);
	return ret;
}

static void enter_root(const char *device)
{
	sys3(SYS_mkdir, "/lower", 0755, 0);
	sys3(SYS_mkdir, "/rw", 0755, 0);
	sys3(SYS_mkdir, "/newroot", 0755, 0);
	must(sys6(SYS_mount, (long)device, (long)"/lower", (long)"ext4", MS_RDONLY, 0),
	     "mounting the root file system");
	must(mount_tmpfs("/rw", 0, "mode=0755,huge=within_size", "mode=0755"),
	     "mounting the writable layer");
	sys3(SYS_mkdir, "/rw/upper", 0755, 0);
	sys3(SYS_mkdir, "/rw/work", 0755, 0);
	must(sys6(SYS_mount, (long)"overlay", (long)"/newroot", (long)"overlay", 0,
		  (long)"lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work"),
	     "mounting the overlay");
	must(sys3(SYS_chdir, "/newroot", 0, 0), "chdir /newroot");
	must(sys6(SYS_mount, (long)".", (long)"/", 0, MS_MOVE, 0), "moving the root");
	must(sys3(SYS_chroot, ".", 0, 0), "chroot");
	sys3(SYS_chdir, "/", 0, 0);
	sys3(SYS_mkdir, "/proc", 0555, 0);
	sys3(SYS_mkdir, "/sys", 0555, 0);
	sys3(SYS_mkdir, "/dev", 0755, 0);
	sys3(SYS_mkdir, "/tmp", 01777, 0);
	sys6(SYS_mount, (long)"proc", (long)"/proc", (long)"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
	sys6(SYS_mount, (long)"sysfs", (long)"/sys", (long)"sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, 0);
	sys6(SYS_mount, (long)"devtmpfs", (long)"/dev", (long)"devtmpfs", MS_NOSUID, 0);
	/* /tmp on a tmpfs of its own, as Debian 13 and most distributions mount it. Its
	 * bytes sit in guest RAM either way (the overlay's upper layer is a tmpfs too), but
	 * each overlay operation also looks through both layers and overrides credentials:
	 * a small file's create + write + rename costs ~45 ms of emulated kernel on the
	 * overlay here and ~15 ms on a plain tmpfs. */
	mount_tmpfs("/tmp", MS_NOSUID | MS_NODEV, "mode=1777,huge=within_size", "mode=1777");
}

/* struct sockaddr_in and struct ifreq (x86-64 layout) */
struct in4 {
	unsigned short family, port;
	unsigned char addr[4];
	unsigned char zero[8];
};
struct ifreq {
	char name[16];
	union {
		struct in4 addr;
		short flags;
		char pad[24];
	} u;
};
struct rtentry {
	unsigned long pad1;
	struct in4 dst, gateway, genmask;
	unsigned short flags;
	short pad2;
	unsigned long pad3;
	void *pad4;
	short metric;
	char *dev;
	unsigned long mtu, window;
	unsigned short irtt;
};

/* "a.b.c.d" at *s into out; returns the character after it, or 0 if malformed. */
static const char *parse_ip(const char *s, unsigned char out[4])
{
	for (int i = 0; i < 4; i++) {
		unsigned v = 0;
		int digits = 0;
		while (*s >= '0' && *s <= '9' && digits < 3) {
			v = v * 10 + (unsigned)(*s++ - '0');
			digits++;
		}
		if (!digits || v > 255 || (i < 3 && *s++ != '.'))
			return 0;
		out[i] = (unsigned char)v;
	}
	return s;
}

static void set_name(struct ifreq *req, const char *name)
{
	for (int i = 0; i < 16; i++)
		req->u.pad[i] = req->name[i] = 0;
	for (int i = 0; name[i] && i < 15; i++)
		req->name[i] = name[i];
}

static void link_up(long sock, const char *name)
{
	struct ifreq req;
	set_name(&req, name);
	if (sys3(SYS_ioctl, sock, SIOCGIFFLAGS, &req) == 0) {
		req.u.flags |= IFF_UP;
		if (sys3(SYS_ioctl, sock, SIOCSIFFLAGS, &req) == 0)
			return;
	}
	say("ember-init: cannot bring up ");
	say(name);
	say("\n");
}

/* "nameserver GATEWAY" in /etc/resolv.conf, on the overlay (the image keeps its own). A
 * symlink there is removed, not followed: nothing outside the file is written. */
static void set_resolver(const char *gateway)
{
	static const char head[] = "nameserver ";
	sys3(SYS_unlink, "/etc/resolv.conf", 0, 0);
	long fd = sys3(SYS_open, "/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW,
		       0644);
	if (fd < 0) {
		say("ember-init: cannot write /etc/resolv.conf\n");
		return;
	}
	sys3(SYS_write, fd, head, sizeof(head) - 1);
	sys3(SYS_write, fd, gateway, len(gateway));
	sys3(SYS_write, fd, "\n", 1);
	sys3(SYS_close, fd, 0, 0);
}

/* lo always; eth0 from ember.net=ADDR/PREFIX[,GATEWAY], which also serves DNS. */
static void net_up(const char *spec)
{
	long sock = sys3(SYS_socket, AF_INET, SOCK_DGRAM, 0);
	if (sock < 0)
		return;
	link_up(sock, "lo");
	if (!spec)
		return;
	struct ifreq req;
	struct in4 addr = {AF_INET, 0, {0}, {0}}, mask = addr, gw = addr;
	unsigned prefix = 0;
	int have_gw = 0;
	const char *gw_text = 0;
	const char *p = parse_ip(spec, addr.addr);
	if (p && *p == '/') {
		p++;
		while (*p >= '0' && *p <= '9')
			prefix = prefix * 10 + (unsigned)(*p++ - '0');
	} else {
		p = 0;
	}
	if (p && *p == ',') {
		gw_text = p + 1;
		p = parse_ip(gw_text, gw.addr);
		have_gw = 1;
	}
	if (!p || *p || prefix > 32) {
		say("ember-init: ignoring malformed ember.net=\n");
		return;
	}
	for (unsigned i = 0; i < prefix; i++)
		mask.addr[i / 8] |= (unsigned char)(0x80 >> (i % 8));
	set_name(&req, "eth0");
	req.u.addr = addr;
	if (sys3(SYS_ioctl, sock, SIOCSIFADDR, &req) != 0) {
		say("ember-init: cannot set the address of eth0\n");
		return;
	}
	req.u.addr = mask;
	sys3(SYS_ioctl, sock, SIOCSIFNETMASK, &req);
	link_up(sock, "eth0");
	if (have_gw) {
		struct rtentry route;
		char *bytes = (char *)&route;
		for (size_t i = 0; i < sizeof(route); i++)
			bytes[i] = 0;
		route.dst.family = route.genmask.family = AF_INET;
		route.gateway = gw;
		route.flags = RTF_UP | RTF_GATEWAY;
		if (sys3(SYS_ioctl, sock, SIOCADDRT, &route) != 0)
			say("ember-init: cannot add the default route\n");
		set_resolver(gw_text);
	}
	sys3(SYS_close, sock, 0, 0);
}

static long run(char *args, size_t n)
{
	char *argv[ARGV_MAX];
	int argc = 0;
	size_t i = 0;
	while (i < n && argc < ARGV_MAX - 1) {
		argv[argc++] = args + i;
		while (i < n && args[i])
			i++;
		i++;
	}
	argv[argc] = 0;
	if (!argc) {
		say("ember-init: no workload given (ember.cmd=)\n");
		return 127;
	}
	long pid = sys3(SYS_fork, 0, 0, 0);
	if (pid == 0) {
		sys3(SYS_setsid, 0, 0, 0);
		sys3(SYS_execve, argv[0], argv, envp);
		/* no PATH search in the kernel: try the usual directories */
		static const char *const dirs[] = {"/usr/local/bin/", "/usr/bin/", "/bin/",
						   "/usr/sbin/", "/sbin/", 0};
		char path[512];
		for (int d = 0; dirs[d]; d++) {
			size_t k = 0;
			for (const char *q = dirs[d]; *q && k < sizeof(path) - 1; q++)
				path[k++] = *q;
			for (const char *q = argv[0]; *q && k < sizeof(path) - 1; q++)
				path[k++] = *q;
			path[k] = 0;
			sys3(SYS_execve, path, argv, envp);
		}
		say("ember-init: cannot execute ");
		say(argv[0]);
		say("\n");
		sys3(SYS_exit, 127, 0, 0);
	}
	must(pid, "fork");
	/* PID 1 reaps every orphan; the workload's own status is what we report. */
	for (;;) {
		int wstatus = 0;
		long got = sys6(SYS_wait4, -1, (long)&wstatus, 0, 0, 0);
		if (got == -ECHILD)
			return 127;
		if (got == pid) {
			if ((wstatus & 0x7f) == 0)
				return (wstatus >> 8) & 0xff;
			return 128 + (wstatus & 0x7f);
		}
	}
}

void _start(void)
{
	static char cmdline[CMDLINE_MAX];
	static char root[256];
	static char args[ARGS_MAX];
	static char net[64];
	static char simd[16];
	long fd, n;

	fd = sys3(SYS_open, "/dev/console", O_RDWR, 0);
	if (fd >= 0 && fd != 0) {
		sys3(SYS_dup2, fd, 0, 0);
		sys3(SYS_dup2, fd, 1, 0);
		sys3(SYS_dup2, fd, 2, 0);
	}
	sys3(SYS_mkdir, "/proc", 0555, 0);
	sys6(SYS_mount, (long)"proc", (long)"/proc", (long)"proc", 0, 0);
	fd = sys3(SYS_open, "/proc/cmdline", O_RDONLY, 0);
	n = fd >= 0 ? sys3(SYS_read, fd, cmdline, sizeof(cmdline) - 1) : 0;
	cmdline[n > 0 ? n : 0] = 0;
	if (fd >= 0)
		sys3(SYS_close, fd, 0, 0);

	if (!param(cmdline, "ember.root=", root, sizeof(root)))
		test_mode();

	size_t argsize = 0;
	if (param(cmdline, "ember.cmd=", args, sizeof(args)))
		argsize = unbase64(args);
	if (param(cmdline, "ember.simd=", simd, sizeof(simd)) && simd[0] == 's' && simd[1] == 's' &&
	    simd[2] == 'e' && !simd[3])
		use_sse_only();
	sys6(SYS_umount2, (long)"/proc", 0, 0, 0, 0);
	/* the initramfs has no device nodes but the console: devtmpfs has the disks */
	sys3(SYS_mkdir, "/dev", 0755, 0);
	sys6(SYS_mount, (long)"devtmpfs", (long)"/dev", (long)"devtmpfs", MS_NOSUID, 0);
	enter_root(root);
	net_up(param(cmdline, "ember.net=", net, sizeof(net)) ? net : 0);
	long status = run(args, argsize);
	sys3(SYS_kill, -1, SIGKILL, 0);
	end(status);
}
