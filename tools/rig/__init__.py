"""The rig: real components on one machine, for tests, benches and the demo.

Everything here runs real pieces, not fakes: loop devices and LVM, sanlock
daemons (one per simulated host, each in its own mount namespace), the real
``xtnd spm`` daemon as a process, libvirt/QEMU guests. Product commands
(``xtnd demo``, ``xtnd hsm bench``) and the tests import it from here.
Everything needs root.

Modules (import them by name, e.g. ``from xtnd.tools.rig import loops``):

- wait: wait_for(predicate, timeout) and Timeout, for waiting on conditions.
- loops: files under /var/tmp on loop devices; loop_pvs() for LVM PVs;
  detach_stale() as a safety net; fail_storage()/restore_storage() to make
  one host's view of shared storage fail.
- sanlockd: SanlockDaemon, a real sanlock daemon playing one host in its own
  mount namespace; popen()/argv() run a client (an SPM, an HSM, the sanlock
  CLI) inside that host; missing() says why it cannot run here.
- guest: build_rig() (a TCG guest kernel and busybox initramfs from
  installed Debian packages), Workload, Guest/guest() libvirt domains.
- spmd: Pool (a master block domain for SPM runs) and SpmProcess (``xtnd
  spm`` in a host's namespace, its log parsed).
- hsmrig: pool() (a master block domain with prepared thin volumes and HSM
  configs), spm_daemon(), an in-process SPM with a Gate, NamespacedLibvirtd.
- cluster: Cluster/ClusterSpec, a whole simulated cluster (what ``xtnd
  demo`` runs): one block domain per host made by the real CLI, per host a
  sanlock daemon, ``xtnd spm`` (first hosts) and ``xtnd hsm`` as processes
  (DaemonProcess: log, wait_log, kill, stop), a prepared thin volume per
  host; stop() removes it all, sweep() what a killed run left.

Every child process gets PR_SET_PDEATHSIG(SIGKILL) (sanlockd.die_with_parent):
nothing a rig starts survives the process that started it.
"""
